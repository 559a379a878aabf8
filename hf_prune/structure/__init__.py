"""Structure: apply a plan by physically removing heads, neurons and blocks; record the shapes; the remote-code file."""
