"""The ONNX bundle: graphs declared once, export honouring a plan, the ONNX Runtime loop, the device run."""
