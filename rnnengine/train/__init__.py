"""Training with the C core's backprop through time: networks, optimisers, ``fit``,
checkpoints (fit.py) and ONNX export (export.py), which comes back through ``convert``."""
from rnnengine.train.fit import (SGD, Adam, Network, char_vocab, check_data, evaluate, export_char_lm, fit,
                                 load_checkpoint, loss_and_grad, make_optimizer, save_checkpoint)

__all__ = ["Network", "Adam", "SGD", "fit", "evaluate", "loss_and_grad", "check_data", "make_optimizer",
           "save_checkpoint", "load_checkpoint", "char_vocab", "export_char_lm"]
