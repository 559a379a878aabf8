"""Recipes: the YAML schema, the runner that executes a whole job, its reports and the hf-prune CLI."""
