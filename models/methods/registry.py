"""Method configuration and registry: `build_method(config, model)` turns a MethodConfig into a Method."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from cirflow.core.config import check_choice, check_fraction, check_non_negative, check_positive
from cirflow.models.cir_model import CIRModel
from cirflow.models.methods.base import BaseMethod, BatchFeatures, Method  # noqa: F401  (re-exported)
from cirflow.models.methods.cala import LOSS_FORMS, CaLa
from cirflow.models.methods.dra import DRA
from cirflow.models.methods.tmcir import GENERATORS, TMCIR

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MethodConfig:
    name: str = "base"  # a key of METHODS: base | cala | dra | tmcir
    # CaLa (official code's values unless noted)
    tbia: bool = True  # text-bridged image alignment through HCA
    ctr: bool = True  # complementary text reasoning through TAC
    loss_form: str = "paper"  # "paper": L_QTM + alpha*L_TBIA + beta*L_CTR; "official": the code's logit mix
    alpha: float = 1.0  # paper form: weight of L_TBIA
    beta: float = 1.0  # paper form: weight of L_CTR
    w_hca: float = 0.1  # official form: weight of CE(S_TBIA)
    w_tac: float = 0.45  # official form: share of S_CTR in the mixed logits
    aux_scale: float = 10.0  # InfoNCE scale of the auxiliary losses (CaLa's 10; DRA's L_imp too)
    tac_steps: int = 4  # TAC applies each attention block this many times
    attn_dropout: float = 0.1  # HCA's dropout on its attention probabilities
    tac_dropout: float = 0.0  # TAC's attention dropout (0 in the official code)
    # DRA
    lambda_imp: float = 1.0  # weight of L_imp = InfoNCE(t, TAC(V_r, V_t))
    lambda_aug: float = 1.0  # weight of L_aug, QTM with the compensated text t + c
    # TMCIR
    generator: str = "oracle"  # a key of GENERATORS: oracle (the true target, an upper bound)
    iacma_steps: int = 0  # length of the intent-aware alignment stage before ATF training (0 = skip)
    iacma_logit_scale: float = 14.3  # IACMA's learnable temperature starts at CLIP's 1/0.07
    iacma_max_logit_scale: float = 100.0  # and is capped like the QTM scale

    def __post_init__(self) -> None:
        if self.name not in METHODS:
            raise ValueError(f"unknown method {self.name!r}; choose one of {sorted(METHODS)}")
        check_choice(self.loss_form, "loss_form", LOSS_FORMS)
        if self.generator not in GENERATORS:
            raise ValueError(f"unknown generator {self.generator!r}; choose one of {sorted(GENERATORS)}")
        check_positive(self, "tac_steps", "aux_scale", "iacma_logit_scale", "iacma_max_logit_scale")
        check_non_negative(self, "alpha", "beta", "lambda_imp", "lambda_aug", "iacma_steps")  # 0 = term off
        check_fraction(self, "w_hca", "w_tac", "attn_dropout", "tac_dropout")
        if self.iacma_logit_scale > self.iacma_max_logit_scale:
            # The clamp would hold the temperature at the cap with zero gradient: it could never be learned.
            raise ValueError(f"iacma_logit_scale={self.iacma_logit_scale} exceeds "
                             f"iacma_max_logit_scale={self.iacma_max_logit_scale}")


def _base(config: MethodConfig, model: CIRModel) -> Method:
    return BaseMethod()


def _cala(config: MethodConfig, model: CIRModel) -> Method:
    return CaLa(model.config.image.dim, model.config.text.dim, model.embed_dim, tbia=config.tbia, ctr=config.ctr,
                loss_form=config.loss_form, alpha=config.alpha, beta=config.beta, w_hca=config.w_hca,
                w_tac=config.w_tac, aux_scale=config.aux_scale, tac_steps=config.tac_steps,
                hca_dropout=config.attn_dropout, tac_dropout=config.tac_dropout)


def _dra(config: MethodConfig, model: CIRModel) -> Method:
    return DRA(model.config.image.dim, model.embed_dim, lambda_imp=config.lambda_imp, lambda_aug=config.lambda_aug,
               aux_scale=config.aux_scale, tac_steps=config.tac_steps, tac_dropout=config.tac_dropout)


def _tmcir(config: MethodConfig, model: CIRModel) -> Method:
    if model.config.composer.name != "atf":
        # IACMA aligns the towers whatever the composer; ATF is TMCIR's composer, so another one replaces it.
        log.warning("method tmcir with composer %r: the IACMA stage applies, TMCIR's ATF composer is not in use "
                    "(model.composer.name=atf for it)", model.config.composer.name)
    # A generator is only built when there is an IACMA stage to feed (a real one would be a whole model).
    generator = GENERATORS[config.generator]() if config.iacma_steps > 0 else None
    return TMCIR(generator, config.iacma_logit_scale, config.iacma_max_logit_scale)


METHODS: dict[str, Callable[[MethodConfig, CIRModel], Method]] = {
    "base": _base, "cala": _cala, "dra": _dra, "tmcir": _tmcir,
}


def build_method(config: MethodConfig, model: CIRModel, symmetric: bool = False) -> Method:
    """The training method for `model`. Its parameters are its own (never the model's): hand
    `method.parameters()` to the optimiser and save `method.state_dict()` with resumable checkpoints only.
    `symmetric` makes every QTM term two-way."""
    method = METHODS[config.name](config, model)
    method.symmetric = symmetric
    log.info("method %s: %d training-only parameters", method.label, sum(p.numel() for p in method.parameters()))
    return method
