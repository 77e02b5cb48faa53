"""wildcheck serving: the ONNX contract, preprocessing, decisions and the BentoML service (no torch)."""
