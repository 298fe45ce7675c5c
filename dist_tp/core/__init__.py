"""Foundations every room uses: the device, per-step seeding, atomic files and checkpoints."""
