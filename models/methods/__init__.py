"""Training methods (base QTM, CaLa, DRA, TMCIR): training-only losses and parameters around a CIRModel.

    method = build_method(MethodConfig(name="cala"), model)
    loss, logs = method.loss(model, encode_batch(model, images, reference, target, ids, mask), None, scale())
"""

from cirflow.models.methods.base import BatchFeatures, Method, encode_batch
from cirflow.models.methods.registry import METHODS, MethodConfig, build_method
from cirflow.models.methods.tmcir import GENERATORS, TMCIR, iacma_loss

__all__ = ["BatchFeatures", "GENERATORS", "METHODS", "Method", "MethodConfig", "TMCIR", "build_method",
           "encode_batch", "iacma_loss"]
