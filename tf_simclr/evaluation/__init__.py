"""Reading a model out without training it: supervised eval, kNN, linear probe, features."""
