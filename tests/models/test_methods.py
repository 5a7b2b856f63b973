import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cirflow.models.cir_model import CIRModel, Features, ModelConfig, build_model
from cirflow.models.composers import ComposerConfig, SumComposer
from cirflow.models.image_encoder import ImageEncoderConfig
from cirflow.models.losses import batch_contrastive, info_nce
from cirflow.models.methods.base import BatchFeatures, Method, encode_batch
from cirflow.models.methods.cala import CaLa
from cirflow.models.methods.dra import DRA
from cirflow.models.methods.hca import HingeCrossAttention
from cirflow.models.methods.registry import METHODS, MethodConfig, build_method
from cirflow.models.methods.tac import TwinAttentionCompositor
from cirflow.models.methods.tmcir import GENERATORS, TMCIR, OracleGenerator
from cirflow.models.text_encoder import TextEncoderConfig

DIM, EMBED, B = 16, 12, 4  # token width != embedding size: the auxiliary branches project


def tiny_model(composer: str = "combiner", dim: int = DIM, embed: int = EMBED, seed: int = 0) -> CIRModel:
    torch.manual_seed(seed)
    return build_model(ModelConfig(
        ImageEncoderConfig(image_size=32, widths=(8, 16), dim=dim, layers=1, heads=2, embed_dim=embed),
        TextEncoderConfig(vocab_size=50, max_length=8, dim=dim, layers=1, heads=2, embed_dim=embed),
        ComposerConfig(name=composer, atf_heads=2)))


def tiny_batch() -> dict[str, torch.Tensor]:
    """B=4 queries over U=5 distinct images: queries 0 and 1 share a reference, query 3's target is image 2."""
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(B, 6, dtype=torch.long)
    mask[1, 3:] = 0
    return {"images": torch.randn(5, 3, 32, 32, generator=g), "reference": torch.tensor([0, 0, 1, 2]),
            "target": torch.tensor([3, 4, 2, 1]), "ids": torch.randint(4, 50, (B, 6), generator=g), "mask": mask}


def features(model: CIRModel) -> BatchFeatures:
    return encode_batch(model, **tiny_batch())


def base_loss(model: CIRModel, f: BatchFeatures, scale: float) -> torch.Tensor:
    return batch_contrastive(model.compose_features(f.ref) @ f.g.T, f.target, f.reference, scale)


def test_unknown_names_list_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown method 'clip'; choose one of \['base', 'cala', 'dra', 'tmcir'\]"):
        MethodConfig(name="clip")
    with pytest.raises(ValueError, match=r"loss_form='mixed' is not one of \['paper', 'official'\]"):
        MethodConfig(loss_form="mixed")
    with pytest.raises(ValueError, match=r"unknown generator 'diffusion'; choose one of \['oracle'\]"):
        MethodConfig(generator="diffusion")


def test_base_is_the_qtm_loss() -> None:
    model = tiny_model().eval()
    f = features(model)
    loss, logs = build_method(MethodConfig(), model).loss(model, f, None, torch.tensor(5.0))
    assert torch.equal(loss, base_loss(model, f, 5.0)) and set(logs) == {"qtm"}


@pytest.mark.parametrize("embed", [EMBED, DIM])
def test_branch_shapes(embed: int) -> None:
    model = tiny_model(embed=embed).eval()
    f = features(model)
    method = build_method(MethodConfig(name="cala"), model).eval()
    nv = f.ref.image_tokens.shape[1]
    assert method.hca(f.ref.image_tokens, f.ref.text_tokens, f.ref.text_mask, f.image_tokens[f.target]).shape == \
        (B, nv, DIM)
    assert method.tac(f.ref.image_tokens, f.image_tokens[f.target]).shape == (B, DIM)
    for out in (method.pseudo_target(f), method.pair_vector(f)):
        assert out.shape == (B, embed)
        torch.testing.assert_close(out.norm(dim=-1), torch.ones(B))
    assert isinstance(method.hca_proj, nn.Identity) == (embed == DIM)  # a Linear only when d != D
    # The learned CLS (not the original's fresh random one) makes TAC deterministic in eval mode.
    torch.testing.assert_close(method.pair_vector(f), method.pair_vector(f), rtol=0, atol=0)


@pytest.mark.parametrize("config", [MethodConfig(name="cala"), MethodConfig(name="cala", loss_form="official"),
                                    MethodConfig(name="dra")], ids=["cala-paper", "cala-official", "dra"])
def test_gradients_reach_every_branch_parameter(config: MethodConfig) -> None:
    model = tiny_model()
    method = build_method(config, model).train()
    loss, _ = method.loss(model, features(model), None, torch.tensor(5.0))
    loss.backward()
    names = [n for n, _ in method.named_parameters()]
    assert any(n.startswith("tac.") for n in names) and (config.name == "dra" or any("hca." in n for n in names))
    missing = [n for n, p in method.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing


@pytest.mark.parametrize("form", ["paper", "official"])
def test_disabled_cala_branches_do_not_exist_and_reduce_to_base(form: str) -> None:
    model = tiny_model().eval()
    f = features(model)
    neither = build_method(MethodConfig(name="cala", tbia=False, ctr=False, loss_form=form), model)
    assert list(neither.parameters()) == []
    loss, _ = neither.loss(model, f, None, torch.tensor(5.0))
    assert torch.equal(loss, base_loss(model, f, 5.0))
    only_tbia = build_method(MethodConfig(name="cala", ctr=False, loss_form=form), model)
    only_ctr = build_method(MethodConfig(name="cala", tbia=False, loss_form=form), model)
    assert all(n.startswith("hca") for n, _ in only_tbia.named_parameters())
    assert all(n.startswith("tac") for n, _ in only_ctr.named_parameters())


def training_loss(method: Method, model: CIRModel) -> torch.Tensor:
    """Everything the method trains with: its loss, plus TMCIR's IACMA stage loss."""
    loss = method.loss(model, features(model), None, torch.tensor(5.0))[0]
    if isinstance(method, TMCIR):
        loss = loss + method.iacma_loss(model, **tiny_batch())[0]
    return loss


@pytest.mark.parametrize("name", sorted(METHODS))
def test_methods_keep_their_parameters_outside_the_model(name: str) -> None:
    plain = tiny_model("atf").eval()
    model = tiny_model("atf").eval()  # same seed: identical weights
    method = build_method(MethodConfig(name=name, iacma_steps=1), model)
    assert model.state_dict().keys() == plain.state_dict().keys()
    assert not {id(p) for p in method.parameters()} & {id(p) for p in model.parameters()}
    assert not any(k.startswith(("image_encoder", "text_encoder", "composer")) for k in method.state_dict())
    # An optimiser step on the method's parameters alone moves every one of them and nothing of the model:
    # a parameter shared with the model, or one the inference path reads, would change its outputs.
    params = dict(method.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    training_loss(method, model).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())  # the loss trains it
    if params:
        torch.optim.SGD(params.values(), lr=1.0).step()
    assert not [n for n, p in params.items() if torch.equal(p, before[n])], "a method parameter did not move"
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0, msg=key)
    batch = tiny_batch()
    torch.testing.assert_close(model.encode_image(batch["images"]), plain.encode_image(batch["images"]), rtol=0,
                               atol=0)
    torch.testing.assert_close(model.compose(batch["images"][:B], batch["ids"], batch["mask"]),
                               plain.compose(batch["images"][:B], batch["ids"], batch["mask"]), rtol=0, atol=0)


class _Fixed(nn.Module):
    """A composer that returns given query vectors."""

    def __init__(self, q: torch.Tensor) -> None:
        super().__init__()
        self.q = q

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.q


def toy_cala(monkeypatch: pytest.MonkeyPatch, **overrides: object) -> tuple[CaLa, BatchFeatures, _Fixed]:
    """B=2 queries in D=2 with explicit vectors; the HCA/TAC outputs are replaced by fixed ones.

    q = [[1, 0], [0, 1]]; both queries share reference image 2; targets are images 0 and 1;
    g = [[1, 0], [0, 1], [0.6, 0.8]]; HCA pseudo-targets p = [[0.6, 0.8], [0.8, 0.6]];
    t = [[1, 0], [0, 1]]; TAC pair vectors c = [[1, 0], [0.6, 0.8]].
    """
    model = tiny_model()
    method = build_method(MethodConfig(name="cala", **overrides), model)
    monkeypatch.setattr(method, "pseudo_target", lambda f: torch.tensor([[0.6, 0.8], [0.8, 0.6]]))
    monkeypatch.setattr(method, "pair_vector", lambda f: torch.tensor([[1.0, 0.0], [0.6, 0.8]]))
    eye = torch.eye(2)
    ref = Features(torch.zeros(2, 3, 2), eye, torch.zeros(2, 3, 2), torch.ones(2, 3), eye)
    g = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    f = BatchFeatures(ref, torch.zeros(3, 3, 2), g, torch.tensor([0, 1]), torch.tensor([2, 2]))
    return method, f, _Fixed(eye)


# Hand computation with scale 2 and aux_scale 10 (log1p(e^x) = -log of the positive's softmax share):
# L_QTM: the shared reference (row 2) is masked; logits 2*[1, 0] and 2*[0, 1] -> log(1 + e^-2) = 0.12693 each.
L_QTM = math.log1p(math.exp(-2))
# S_TBIA = 10 p q^T = [[6, 8], [8, 6]]: each positive is 6 against 8 -> log(1 + e^2) = 2.12693.
L_TBIA = math.log1p(math.exp(2))
# S_CTR = 10 t c^T = [[10, 6], [0, 8]]: row 0 -> log(1 + e^-4), row 1 -> log(1 + e^-8); mean 0.009243.
L_CTR = (math.log1p(math.exp(-4)) + math.log1p(math.exp(-8))) / 2
# Official: S_QTM = 2 q g_target^T = [[2, 0], [0, 2]]; 0.45 S_CTR + 0.55 S_QTM = [[5.6, 2.7], [0, 4.7]]
# -> row 0 log(1 + e^-2.9), row 1 log(1 + e^-4.7); mean 0.031308.
L_MIX = (math.log1p(math.exp(-2.9)) + math.log1p(math.exp(-4.7))) / 2


def test_cala_paper_form_matches_hand_computation(monkeypatch: pytest.MonkeyPatch) -> None:
    method, f, composer = toy_cala(monkeypatch, alpha=1.0, beta=0.5)
    loss, logs = method.loss(tiny_model(), f, composer, torch.tensor(2.0))
    assert logs == pytest.approx({"qtm": L_QTM, "tbia": L_TBIA, "ctr": L_CTR}, rel=1e-5)
    assert loss.item() == pytest.approx(L_QTM + 1.0 * L_TBIA + 0.5 * L_CTR, rel=1e-5)  # 2.258477


def test_cala_official_form_matches_hand_computation(monkeypatch: pytest.MonkeyPatch) -> None:
    method, f, composer = toy_cala(monkeypatch, loss_form="official")
    loss, _ = method.loss(tiny_model(), f, composer, torch.tensor(2.0))
    assert loss.item() == pytest.approx(0.1 * L_TBIA + 0.9 * L_MIX, rel=1e-5)  # 0.240870
    # Without CTR there is nothing to mix: the second term is L_QTM itself.
    method, f, composer = toy_cala(monkeypatch, loss_form="official", ctr=False)
    loss, _ = method.loss(tiny_model(), f, composer, torch.tensor(2.0))
    assert loss.item() == pytest.approx(0.1 * L_TBIA + 0.9 * L_QTM, rel=1e-5)
    # Without TBIA the mixed term stands alone.
    method, f, composer = toy_cala(monkeypatch, loss_form="official", tbia=False)
    loss, _ = method.loss(tiny_model(), f, composer, torch.tensor(2.0))
    assert loss.item() == pytest.approx(L_MIX, rel=1e-5)


def test_hca_padding_contributes_nothing() -> None:
    torch.manual_seed(0)
    hca = HingeCrossAttention(DIM, DIM, dropout=0.1).eval()
    ref, text, tgt = torch.randn(2, 5, DIM), torch.randn(2, 6, DIM), torch.randn(2, 5, DIM)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    out = hca(ref, text, mask, tgt)
    noisy = text.clone()
    noisy[0, 4:] = 100 * torch.randn(2, DIM)
    torch.testing.assert_close(hca(ref, noisy, mask, tgt), out, rtol=0, atol=0)
    torch.testing.assert_close(hca(ref[:1], text[:1, :4], mask[:1, :4], tgt[:1]), out[:1], rtol=0, atol=1e-6)


def test_tac_follows_the_twin_recurrence() -> None:
    torch.manual_seed(0)
    tac = TwinAttentionCompositor(DIM, steps=2, dropout=0.0).eval()
    r, g = torch.randn(2, 3, DIM), torch.randn(2, 3, DIM)
    cls = tac.cls.expand(2, -1, -1)
    rq, gq = torch.cat([cls, r], 1), torch.cat([cls, g], 1)
    one = tac.reference_query(rq, gq, gq)[0]
    one = tac.reference_query(rq, one, one)[0]  # step 2: keys/values are step 1's output
    two = tac.target_query(gq, rq, rq)[0]
    two = tac.target_query(gq, two, two)[0]
    torch.testing.assert_close(tac(r, g), (one[:, 0] + two[:, 0]) / 2)


def test_dra_loss_terms() -> None:
    model = tiny_model().eval()
    f = features(model)
    method: DRA = build_method(MethodConfig(name="dra", lambda_imp=0.5, lambda_aug=2.0), model).eval()
    loss, logs = method.loss(model, f, None, torch.tensor(5.0))
    c = method.pair_vector(f)
    assert logs["imp"] == pytest.approx(info_nce(f.ref.t, c, 10.0).item(), rel=1e-6)
    q_aug = model.compose_features(replace(f.ref, t=F.normalize(f.ref.t + c, dim=-1)))
    assert logs["aug"] == pytest.approx(batch_contrastive(q_aug @ f.g.T, f.target, f.reference, 5.0).item(), rel=1e-6)
    assert logs["qtm"] == pytest.approx(base_loss(model, f, 5.0).item(), rel=1e-6)
    assert loss.item() == pytest.approx(logs["qtm"] + 0.5 * logs["imp"] + 2.0 * logs["aug"], rel=1e-6)
    # Two-stage recipe, stage 1: the sum composer passed as `composer` composes both q and q_aug.
    _, logs_sum = method.loss(model, f, SumComposer(EMBED, DIM, ComposerConfig(name="sum")), torch.tensor(5.0))
    q_aug_sum = F.normalize(f.ref.v + F.normalize(f.ref.t + c, dim=-1), dim=-1)
    assert logs_sum["aug"] == pytest.approx(batch_contrastive(q_aug_sum @ f.g.T, f.target, f.reference, 5.0).item(),
                                            rel=1e-6)


def test_tmcir_trains_atf_with_qtm_and_iacma_with_the_oracle() -> None:
    model = tiny_model("atf").eval()
    f = features(model)
    method = build_method(MethodConfig(name="tmcir", iacma_steps=10), model)
    assert isinstance(method, TMCIR) and "UPPER BOUND" in method.label
    assert torch.equal(method.loss(model, f, None, torch.tensor(5.0))[0], base_loss(model, f, 5.0))
    batch = tiny_batch()
    pixels = OracleGenerator()(batch["images"][batch["reference"]], batch["images"][batch["target"]])
    assert torch.equal(pixels, batch["images"][batch["target"]]) and "UPPER BOUND" in OracleGenerator.label
    loss, logs = method.iacma_loss(model, **batch)
    loss.backward()
    assert set(logs) == {"iacma", "iacma_scale"} and math.isfinite(logs["iacma"])
    for module in (model.image_encoder, model.text_encoder, method.temperature):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    no_stage = build_method(MethodConfig(name="tmcir"), model)
    assert "no IACMA" in no_stage.label
    with pytest.raises(RuntimeError, match="iacma_steps"):
        no_stage.iacma_loss(model, **batch)


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_generators_give_one_pseudo_target_per_query(name: str) -> None:
    batch = tiny_batch()
    reference, target = batch["images"][batch["reference"]], batch["images"][batch["target"]]
    generator = GENERATORS[name]()
    assert generator(reference, target).shape == target.shape
    method = build_method(MethodConfig(name="tmcir", generator=name, iacma_steps=1), tiny_model("atf"))
    assert generator.label in method.label  # reports say which generator produced the IACMA results
