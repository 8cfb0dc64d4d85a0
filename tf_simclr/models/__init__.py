"""ResNet encoders, projection/supervised heads and the SimCLR model."""
