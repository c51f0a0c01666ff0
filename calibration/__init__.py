"""glm-export calibration: INT8 ranges from user data, quantization, accuracy figures. Imports runtime only."""
