"""Training methods behind one stepper interface: joint training and TP."""
