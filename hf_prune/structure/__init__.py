"""Structure: apply a plan by physically removing heads, neurons and blocks (optionally refitting the shrunk output
projections by least squares); record the shapes; the remote-code file."""
