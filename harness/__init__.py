"""rqbench: how much reasoning accuracy does each quantization method keep?"""
__version__ = "0.1.0"
