"""Training methods (base QTM, CaLa, DRA, TMCIR): training-only losses and parameters around a CIRModel.

    from cirflow.models.methods.base import encode_batch
    from cirflow.models.methods.registry import MethodConfig, build_method

    method = build_method(MethodConfig(name="cala"), model)
    loss, logs = method.loss(model, encode_batch(model, images, reference, target, ids, mask), None, scale())

Nothing is imported here: the methods import models.methods.base, and a package that imported them back would
make every one of them part of an import circle.
"""
