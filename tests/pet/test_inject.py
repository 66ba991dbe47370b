"""Every preset builds on tiny BART and T5, trains exactly its trainable parameters, and sits where the spec says."""

import pytest
import torch

from vlpet_cli.pet import anatomy
from vlpet_cli.presets import list_presets, resolve
from vlpet_cli.vl.model import build_model

FEAT = 16


def make(preset: str, backbone, *overrides):
    torch.manual_seed(0)
    resolved = resolve(preset, [f"model.feat_dim={FEAT}", *overrides], backbone=str(backbone))
    return build_model(resolved, weights=True)


def batch_for(tok, n_img=1, task="vqa"):
    enc = tok(["vqa: what color is the circle ?", "vqa: how many"], padding=True, return_tensors="pt")
    labels = tok(["red", "2 circle"], padding=True, return_tensors="pt").input_ids
    labels[labels == tok.pad_token_id] = -100
    return {"task": task, "input_ids": enc.input_ids, "attention_mask": enc.attention_mask,
            "vis_feats": torch.randn(2, n_img, 49, FEAT), "labels": labels,
            "loss_weights": torch.tensor([1.0, 0.6]), "loss_reduction": "example"}


# every preset on both backbones; `make test-fast` takes each preset on one of them, in turn (the other is slow-marked)
@pytest.mark.parametrize("preset,family", [
    pytest.param(preset, family, id=f"{preset}-{family}",
                 marks=() if (i + j) % 2 == 0 else pytest.mark.slow)
    for i, preset in enumerate(list_presets()) for j, family in enumerate(["bart", "t5"])])
def test_preset_trains_exactly_its_trainable_parameters(preset, family, tiny_dirs):
    model, tok = make(preset, tiny_dirs[family])
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "a preset must train something"
    loss = model(batch_for(tok, n_img=2 if preset == "vlpet-small" else 1))
    assert torch.isfinite(loss)
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    # the box branch sees all-zero boxes, so its weight gets an exactly-zero gradient but still a grad tensor;
    # HyperFormer's other tasks' embeddings get none (each task's is its own parameter, as the reference's)
    idle = {n for n in trainable if n.startswith("pet.task_embeddings.") and not n.endswith(".vqa")}
    assert with_grad == trainable - idle
    assert bool(idle) == (preset == "hyperformer")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    opt.step()
    for name, p in model.named_parameters():
        if name not in trainable:
            assert torch.equal(p, before[name]), f"frozen {name} changed"
    changed = [n for n in trainable if not torch.equal(model.get_parameter(n), before[n])]
    assert changed and not idle & set(changed)


def encoder_sublayer_outputs(model, batch):
    """Outputs of every encoder sub-layer's H module (after the PET hook)."""
    outs = []
    handles = [s.h_module.register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o))
               for s in anatomy.sublayers(model.backbone) if s.stack == "encoder"]
    model.encode(batch)
    for h in handles:
        h.remove()
    return outs


@pytest.mark.parametrize("preset,factor", [("vlpet-large", 0.15), ("vlpet-middlex", 0.15), ("vlpet-small", 0.15),
                                           ("vlpet-middley", 0.3)])
def test_t5_zero_init_scales_sublayer_output(preset, factor, tiny_dirs):
    """T5 reference init: ΔH = 0 and G = σ(0) = 0.5 (middleY: 1), times s = 0.3, at step 0 (spec §1.6)."""
    model, tok = make(preset, tiny_dirs["t5"])
    model.eval()
    batch = batch_for(tok)
    # Run the sub-layers with the PET hooks in place, recording H before the hook alters it.
    raw, gated = [], []
    for sub in anatomy.sublayers(model.backbone):
        if sub.stack == "encoder":
            sub.h_module.register_forward_hook(
                lambda m, a, o: gated.append(o[0] if isinstance(o, tuple) else o), prepend=False)
            sub.h_module.register_forward_hook(
                lambda m, a, o: raw.append((o[0] if isinstance(o, tuple) else o).clone()), prepend=True)
    with torch.no_grad():
        model.encode(batch)
    assert len(raw) == len(gated) == 4
    for h, out in zip(raw, gated):
        assert torch.allclose(out, factor * h, atol=1e-6)


def test_bart_placement_is_before_dropout_residual_and_layernorm(tiny_dirs):
    """BART post-LN: out = LN(X + s·G(X, H1)⊙H1), H1 = H + ΔH(H), X = the sub-layer input (spec §1.1)."""
    model, tok = make("vlpet-large", tiny_dirs["bart"])
    model.eval()
    layer = model.backbone.get_encoder().layers[0]
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        out = layer(x, attention_mask=None)
        out = out[0] if isinstance(out, tuple) else out
        pet = model.pet
        model.pet.remove_hooks()
        h = layer.self_attn(x, attention_mask=None)[0]
        h1 = h + pet.encoder_modules["encoder_0_attn"](h)
        a = layer.self_attn_layer_norm(x + pet.gates["encoder_0_attn"](x, h1))
        f = layer.fc2(layer.activation_fn(layer.fc1(a)))
        f1 = f + pet.encoder_modules["encoder_0_ffn"](f)
        expected = layer.final_layer_norm(a + pet.gates["encoder_0_ffn"](a, f1))
    assert torch.allclose(out, expected, atol=1e-5)


def test_value_adapter_reads_the_encoder_output(tiny_dirs):
    model, tok = make("vlpet-small", tiny_dirs["bart"])
    model.eval()
    attn = model.backbone.get_decoder().layers[1].encoder_attn
    e = torch.randn(2, 9, 32)
    with torch.no_grad():
        with_pet = attn.v_proj(e)
        expected = e @ attn.v_proj.weight.T + attn.v_proj.bias + model.pet.value["decoder_1_cross"](e)
    assert torch.allclose(with_pet, expected, atol=1e-6)


def test_bart_visual_tokens_skip_positions_and_embedding_layernorm(tiny_dirs):
    model, tok = make("vlpet-small", tiny_dirs["bart"])
    model.eval()
    batch = batch_for(tok)
    seen = {}
    enc = model.backbone.get_encoder()

    def capture(module, args, kwargs):
        seen["x"] = args[0] if args else kwargs["hidden_states"]

    enc.layers[0].register_forward_pre_hook(capture, with_kwargs=True)
    with torch.no_grad():
        embeds, mask, t = model.embed(batch)
        model.encode(batch)
    assert torch.allclose(seen["x"][:, t:], embeds[:, t:], atol=1e-6)  # visual rows: untouched (eval: no dropout)
    pos = enc.embed_positions(embeds[:, :t, -1])
    assert torch.allclose(seen["x"][:, :t], enc.layernorm_embedding(embeds[:, :t] + pos), atol=1e-5)


def test_hyperformer_needs_the_task(tiny_dirs):
    from vlpet_cli.errors import VlpetError

    model, tok = make("hyperformer", tiny_dirs["bart"])
    with pytest.raises(VlpetError, match="HyperFormer needs the current task"):
        model(batch_for(tok, task=None))


def test_prompts_and_context_are_asked_of_pet_modules(tiny_dirs):
    """vl.model reads the prompts and sets the task and mask through PetModules' public methods."""
    model, tok = make("prompt-tuning", tiny_dirs["bart"], "pet.prompt.length=3")
    prompts = model.pet.prompts(2)
    assert prompts.shape == (2, 3, model.config.d_model) and model.pet.prompt_length() == 3
    batch = batch_for(tok)
    embeds, mask, text_len = model.embed(batch)
    assert torch.equal(embeds[:, :3], prompts)
    plain, _ = make("vl-adapter", tiny_dirs["bart"])
    assert plain.pet.prompts(2) is None and plain.pet.prompt_length() == 0
    hyper, tok = make("hyperformer", tiny_dirs["t5"])
    mask = torch.ones(2, 4)
    hyper.pet.set_context("gqa", mask)
    assert hyper.pet.task == "gqa" and hyper.pet.encoder_mask is mask


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_reference_rules_name_their_own_methods_tensors(family):
    """Every declared reference rule compiles for both families and lands in the declaring method's slots."""
    from vlpet_cli.pet.inject import METHODS, owner
    from vlpet_cli.reference import rules

    compiled = rules(family)
    declared = [(m, r) for m in METHODS for r in m.reference.rules]
    assert len(compiled) == len(declared) + 2  # + the projector and its tied object-order table
    for method, rule in declared:
        fields = {f: "0" for f in ("layer", "kind", "dkind", "which", "p", "stack", "att", "proj", "ab", "idx",
                                   "block", "gen", "task")}
        assert rule.role in ("tensor", "head", "task", "task embedding")
        assert owner(rule.target.format(**fields)) is method, (method.label, rule.target)


def test_no_pet_attribute_name_outside_pet():
    """Issue 12: only pet/ spells PetModules' attribute names; the rest of the package asks the declarations."""
    import re
    from pathlib import Path

    from vlpet_cli.pet.inject import METHODS

    slots = "|".join(sorted({s for m in METHODS for s in m.slots}))
    pattern = re.compile(rf"(\w*model|self)\.pet\.({slots})\b|[\"']pet\.({slots})[.\"']|\._lora_targets")
    package = Path(__file__).resolve().parents[2] / "vlpet_cli"
    found = [f"{path.relative_to(package)}:{i}" for path in package.rglob("*.py") if "pet" not in path.parts
             for i, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert package.is_dir() and not found


def test_only_the_import_and_the_reference_names_read_a_methods_reference_naming():
    """Issue 24: what `vlpet import-reference` needs of a method is one record, `Method.reference`; the importer and
    `pet.reference_names` (which also gives training the reference's decay groups) are its only readers."""
    import re
    from pathlib import Path

    pattern = re.compile(r"\.reference\.(rules|label|single_flag|tag|preset|preset_of|identify|sizes|size_hint|hint)\b"
                         r"|\b(method|m)\.reference\b")
    package = Path(__file__).resolve().parents[2] / "vlpet_cli"
    readers = {str(path.relative_to(package)) for path in package.rglob("*.py")
               if any(pattern.search(line) for line in path.read_text().splitlines())}
    assert readers == {"reference.py", "pet/reference_names.py"}
