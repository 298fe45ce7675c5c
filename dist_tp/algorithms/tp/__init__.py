"""Transferrable parameters: the head/tail discriminator, task sampling, the vectorised
inner loops (lanes) and the outer update."""
