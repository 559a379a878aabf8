"""Input/output: save and load pruned models exactly, push them to the Hub, export them to ONNX."""
