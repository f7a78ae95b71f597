"""The attention model: fast vs reference, parity with torch, masks, every scaling learns, clear errors."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ablate.core import names
from ablate.core.config import POSITIONS, SCALINGS, ConfigError, ModelConfig, run_config_from
from ablate.core.sizes import flops_per_sequence
from ablate.model.transformer import (
    MultiHeadAttention,
    RecurrentNet,
    Transformer,
    attention_stats,
    build_model,
    count_params,
    l2_normalize,
    pick_device,
    rotate,
)

B, T, C, H = 3, 7, 12, 3


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(previous)


def _mask(kind: str) -> torch.Tensor | None:
    """none; keys: (B, T) key padding with one all-padding sample; rows: (B, 1, T, T) padded queries see nothing."""
    if kind == "none":
        return None
    real = torch.ones(B, T, dtype=torch.bool)
    real[0, 5:] = False
    real[1, :] = False
    real[2, :2] = False  # left padding: under causal masking, queries 0-1 have no allowed key
    if kind == "keys":
        return real
    return (real[:, :, None] & real[:, None, :]).unsqueeze(1)


def _pair(scaling: str, causal: bool, **kwargs) -> tuple[MultiHeadAttention, MultiHeadAttention]:
    fast = MultiHeadAttention(C, H, scaling=scaling, causal=causal, backend="sdpa", **kwargs).double()
    with torch.no_grad():  # learned factors away from their initial value, so a mix-up of heads shows
        for p in fast.attend.parameters():
            p.mul_(torch.linspace(0.5, 2.0, p.numel(), dtype=p.dtype).view_as(p))
    ref = MultiHeadAttention(C, H, scaling=scaling, causal=causal, backend="manual", **kwargs).double()
    ref.load_state_dict(fast.state_dict())
    return fast, ref


@pytest.mark.parametrize("mask_kind", ["none", "keys", "rows"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("scaling", SCALINGS)
def test_fast_and_reference_agree_forward_and_backward(scaling, causal, mask_kind):
    fast, ref = _pair(scaling, causal)
    mask = _mask(mask_kind)
    x = torch.randn(B, T, C, dtype=torch.float64)
    outs, grads = [], []
    for module in (fast, ref):
        xi = x.clone().requires_grad_()
        y, _ = module(xi, mask)
        (y * torch.linspace(-1, 1, C, dtype=y.dtype)).sum().backward()
        outs.append(y)
        grads.append([xi.grad] + [p.grad for p in module.parameters()])
    assert torch.isfinite(outs[0]).all() and torch.isfinite(outs[1]).all()
    if mask is not None:  # sample 1 is all padding: its queries attend to nothing, so only attn_out's bias is left
        torch.testing.assert_close(outs[0][1], fast.attn_out.bias.expand(T, C))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-10)
    for g_fast, g_ref in zip(grads[0], grads[1], strict=True):
        assert torch.isfinite(g_fast).all()
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-9, atol=1e-10)


def _expected_logits(module: MultiHeadAttention, x: torch.Tensor, scaling: str, allowed: torch.Tensor) -> torch.Tensor:
    """The logits written from each scaling's formula, independently of the model's folding."""
    q, k, _ = module.project(x)
    d = module.head_dim
    dots = q @ k.transpose(-2, -1)  # (B, H, T, T)
    a = module.attend
    if scaling == "sqrt":
        return dots / math.sqrt(d)
    if scaling == "inverse":
        return dots / d
    if scaling == "none":
        return dots
    if scaling == "learned":
        return dots * a.temperature.view(-1, 1, 1)
    if scaling == "qknorm":
        cos = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        return cos * a.qk_gain.view(-1, 1, 1)
    n = allowed.sum(-1, keepdim=True).double()  # logn: keys each query attends to
    return dots / math.sqrt(d) * a.logn_scale.view(-1, 1, 1) * n.log()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("scaling", SCALINGS)
def test_logits_follow_each_scalings_formula(scaling, causal):
    module, _ = _pair(scaling, causal)
    x = torch.randn(B, T, C, dtype=torch.float64)
    real = torch.ones(B, T, dtype=torch.bool)
    real[0, 4:] = False
    allowed = real[:, None, None, :].expand(B, 1, T, T)
    if causal:
        allowed = allowed & torch.ones(T, T, dtype=torch.bool).tril()
    got = module.logits(x, real)
    want = _expected_logits(module, x, scaling, allowed)
    ok = allowed.expand_as(got) & allowed.any(-1, keepdim=True)
    torch.testing.assert_close(got[ok], want.detach()[ok], rtol=1e-10, atol=1e-10)
    assert torch.isneginf(got[~allowed.expand_as(got)]).all()


def test_l2_normalize_backward_matches_numerical_gradient():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    gain = (torch.rand(3, 1, 1, dtype=torch.float64) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(l2_normalize, (x, gain))
    assert torch.autograd.gradcheck(l2_normalize, (x,))


@pytest.mark.parametrize("causal", [False, True])
def test_sqrt_matches_torch_multihead_attention(causal):
    ours = MultiHeadAttention(C, H, causal=causal, backend="manual").double()
    theirs = nn.MultiheadAttention(C, H, batch_first=True).double()
    with torch.no_grad():
        ours.qkv.weight.copy_(theirs.in_proj_weight)
        ours.qkv.bias.copy_(theirs.in_proj_bias)
        ours.attn_out.weight.copy_(theirs.out_proj.weight)
        ours.attn_out.bias.copy_(theirs.out_proj.bias)
    x = torch.randn(B, T, C, dtype=torch.float64)
    real = torch.ones(B, T, dtype=torch.bool)
    real[0, 4:] = False
    blocked = torch.ones(T, T, dtype=torch.bool).triu(1) if causal else None
    want, want_w = theirs(x, x, x, key_padding_mask=~real, attn_mask=blocked, average_attn_weights=False)
    got, got_w = ours(x, real, need_weights=True)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_w, want_w)
    ours.attend.backend = "sdpa"
    torch.testing.assert_close(ours(x, real)[0], want)


def _lm(scaling: str, **kwargs) -> Transformer:
    cfg = ModelConfig(embed_dim=16, num_heads=2, num_layers=2, scaling=scaling, **kwargs)
    return Transformer(cfg, vocab_size=11, max_len=12).eval()


@pytest.mark.parametrize("scaling", SCALINGS)
def test_changing_a_later_token_never_changes_earlier_outputs(scaling):
    model = _lm(scaling)
    tokens = torch.randint(0, 11, (2, 12))
    changed = tokens.clone()
    changed[:, 6] = (changed[:, 6] + 1) % 11
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :6], b[:, :6], rtol=0, atol=0)
    assert (a[:, 6:] - b[:, 6:]).abs().amax() > 1e-4  # the change does reach its own and later positions


@pytest.mark.parametrize("causal", [False, True])
def test_padded_keys_get_zero_weight(causal):
    module = MultiHeadAttention(C, H, causal=causal, backend="manual")
    real = torch.ones(B, T, dtype=torch.bool)
    real[0, 3:] = False
    real[2, 5:] = False
    _, w = module(torch.randn(B, T, C), real, need_weights=True)
    assert (w.masked_select(~real[:, None, None, :].expand_as(w)) == 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(B, H, T))


def padded_pair() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two sequences of 6 tokens (the second padded after 4) and the same tokens padded out to 10, with their masks."""
    short = torch.randint(1, 11, (2, 6))
    real = torch.ones(2, 6, dtype=torch.bool)
    real[1, 4:] = False
    long = torch.cat([short, torch.randint(1, 11, (2, 4))], 1)
    long_real = torch.cat([real, torch.zeros(2, 4, dtype=torch.bool)], 1)
    return short, real, long, long_real


@pytest.mark.parametrize("scaling", SCALINGS)
def test_classifier_output_ignores_extra_padding(scaling):
    """Same tokens padded to 6 or to 10 give the same logits (n of logn counts real keys only)."""
    cfg = ModelConfig(embed_dim=16, num_heads=2, num_layers=2, scaling=scaling)
    model = Transformer(cfg, vocab_size=11, max_len=10, num_classes=3).eval()
    short, real, long, long_real = padded_pair()
    with torch.no_grad():
        torch.testing.assert_close(model(short, real), model(long, long_real))


@pytest.mark.parametrize("backend", ["sdpa", "manual"])
def test_attention_dropout_is_on_in_training_only(backend):
    module = MultiHeadAttention(C, H, dropout=0.5, backend=backend)
    x = torch.randn(B, T, C)
    train_out = module(x)[0]
    eval_out = module.eval()(x)[0]
    assert not torch.allclose(train_out, eval_out)  # training drops weights
    module.attend.dropout = 0.0
    torch.testing.assert_close(module.train()(x)[0], eval_out)  # eval mode is exactly the model without dropout


@pytest.mark.parametrize("scaling", SCALINGS)
def test_every_scaling_learns_to_copy(scaling):
    """A fixed batch of 'a SEP a' sequences: the copy half is only predictable through attention."""
    cfg = ModelConfig(embed_dim=32, num_heads=2, num_layers=2, scaling=scaling)
    model = Transformer(cfg, vocab_size=16, max_len=16)
    half = torch.randint(1, 16, (32, 8))
    tokens = torch.cat([half, torch.zeros(32, 1, dtype=torch.long), half], 1)  # (32, 17)
    targets = tokens[:, 1:].clone()
    targets[:, :8] = -100  # score the copied half only
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), targets.flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05 * math.log(15)  # without attention this stays near 1.1 nats


def test_attention_stats_of_uniform_attention():
    model = _lm("none", head_dim=4)
    for block in model.blocks:  # zero queries and keys: every allowed key equally likely
        block.attn.qkv.weight.data[: 2 * 2 * 4].zero_()
        block.attn.qkv.bias.data.zero_()
    tokens = torch.randint(0, 11, (2, 5))
    real = torch.tensor([[True] * 5, [True, True, True, False, False]])
    stats, maps = attention_stats(model, tokens, real)
    # causal: query i sees i + 1 keys (real ones only) -> entropy log(i + 1); padded queries are not counted
    want = (sum(math.log(i + 1) for i in range(5)) + sum(math.log(i + 1) for i in range(3))) / 8
    for layer in range(2):
        for head in range(2):
            assert stats[names.entropy_metric(layer, head)] == pytest.approx(want, rel=1e-5)
        assert stats[names.max_logit_metric(layer)] == pytest.approx(0.0, abs=1e-6)
    assert maps.shape == (2, 2, 5, 5)
    torch.testing.assert_close(maps[0, 0, 2], torch.tensor([1 / 3, 1 / 3, 1 / 3, 0, 0]))
    assert model.training is False


def test_count_params_and_flops_use_the_decoupled_head_dim():
    cfg = ModelConfig(embed_dim=8, num_heads=2, head_dim=3, num_layers=1, mlp_ratio=2.0)
    attn = MultiHeadAttention(8, 2, head_dim=3)
    assert count_params(attn) == (8 * 18 + 18) + (6 * 8 + 8)
    model = Transformer(cfg, vocab_size=5, max_len=4)
    n = count_params(model)
    block = 2 * 16 + count_params(attn) + (8 * 16 + 16) + (16 * 8 + 8)
    assert n == 5 * 8 + 4 * 8 + block + 16  # tied head counted once, final LayerNorm
    matmul_weights = 8 * 18 + 6 * 8 + 2 * 8 * 16 + 5 * 8  # qkv, attn_out, mlp, the tied head: not biases or norms
    assert flops_per_sequence(cfg, 5, 4) == 4 * (6 * matmul_weights + 12 * 1 * 4 * (2 * 3))  # per token x T


@pytest.mark.parametrize("scaling", ["sqrt", "qknorm", "logn"])
@pytest.mark.parametrize("shape", [{}, {"embed_dim": 32, "head_dim": 5, "mlp_ratio": 2.7}, {"bias": False}])
@pytest.mark.parametrize("num_classes", [None, 10])
def test_flops_are_what_torch_counts_forward_and_backward(scaling, shape, num_classes):
    """The trainer's FLOP count against ``FlopCounterMode`` over a training step's forward and backward. Manual
    attention: torch does not count sdpa's CPU kernel, so the sdpa run adds the attention term (12 L T (H D))."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = ModelConfig(**{"embed_dim": 24, "num_heads": 3, "num_layers": 2, "scaling": scaling, **shape})
    V, T, B = 13, 9, 2
    for backend in ("manual", "sdpa"):
        model = Transformer(dataclasses.replace(cfg, backend=backend), V, T, num_classes)
        with FlopCounterMode(display=False) as counter:
            model(torch.randint(0, V, (B, T))).float().sum().backward()
        uncounted = 0 if backend == "manual" else 12 * cfg.num_layers * T * cfg.num_heads * cfg.resolved_head_dim
        assert counter.get_total_flops() + B * T * uncounted == B * flops_per_sequence(cfg, V, T, num_classes)


def test_bad_configurations_raise_clear_errors():
    with pytest.raises(ValueError, match="embed_dim 10 is not divisible by num_heads 3"):
        MultiHeadAttention(10, 3)
    assert MultiHeadAttention(10, 3, head_dim=4).qkv.out_features == 36  # head_dim set: no divisibility needed
    with pytest.raises(ValueError, match="unknown scaling 'cosine'; allowed: sqrt"):
        MultiHeadAttention(8, 2, scaling="cosine")
    with pytest.raises(ValueError, match="unknown backend 'flash'"):
        MultiHeadAttention(8, 2, backend="flash")
    with pytest.raises(ValueError, match=r"must be in \[0, 1\), got 1.5"):
        MultiHeadAttention(8, 2, dropout=1.5)
    with pytest.raises(ValueError, match="need_weights=True needs backend='manual'"):
        MultiHeadAttention(8, 2)(torch.randn(1, 3, 8), need_weights=True)
    with pytest.raises(ValueError, match="mask must be boolean"):
        MultiHeadAttention(8, 2)(torch.randn(1, 3, 8), torch.ones(1, 3))
    with pytest.raises(ValueError, match="sequence length 13 exceeds the model's max_len 12"):
        _lm("sqrt")(torch.zeros(1, 13, dtype=torch.long))
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        Transformer(ModelConfig(), vocab_size=5, max_len=4, num_classes=1)
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        pick_device("tpu")


def test_pick_device_prefers_an_accelerator():
    assert pick_device("cpu") == torch.device("cpu")
    want = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert pick_device().type == want
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="'cuda' was asked for but is not available"):
            pick_device("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("scaling", SCALINGS)
def test_fast_and_reference_agree_on_cuda(scaling):
    torch.backends.cuda.matmul.allow_tf32 = False
    fast = MultiHeadAttention(64, 4, scaling=scaling, causal=True, backend="sdpa").cuda()
    ref = MultiHeadAttention(64, 4, scaling=scaling, causal=True, backend="manual").cuda()
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(4, 128, 64, device="cuda")
    real = torch.ones(4, 128, dtype=torch.bool, device="cuda")
    real[0, 100:] = False
    for mask in (None, real):
        y_fast, y_ref = fast(x, mask)[0], ref(x, mask)[0]
        assert torch.isfinite(y_fast).all()
        torch.testing.assert_close(y_fast, y_ref, rtol=1e-4, atol=1e-4)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y_bf16 = fast(x, mask)[0]
        torch.testing.assert_close(y_bf16.float(), y_ref, rtol=0.05, atol=0.05)


# --- positions -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("position", ["rope", "none"])
@pytest.mark.parametrize("scaling", ["sqrt", "logn"])
def test_rope_and_no_positions_run_longer_than_training_and_stay_causal(position, scaling):
    model = _lm(scaling, position=position)  # max_len 12
    assert model.extrapolates and not hasattr(model, "pos_emb")
    for times in (2, 4):
        tokens = torch.randint(0, 11, (2, 12 * times))
        changed = tokens.clone()
        changed[:, -1] = (changed[:, -1] + 1) % 11
        with torch.no_grad():
            logits, other = model(tokens), model(changed)
        assert logits.shape == (2, 12 * times, 11) and logits.isfinite().all()
        torch.testing.assert_close(logits[:, :-1], other[:, :-1], rtol=0, atol=0)
        stats, maps = attention_stats(model, tokens)
        assert maps.shape == (2, 2, 12 * times, 12 * times) and all(math.isfinite(v) for v in stats.values())


def test_learned_positions_refuse_longer_input_and_keep_their_parameters():
    model = _lm("sqrt")
    assert not model.extrapolates and model.pos_emb.num_embeddings == 12
    with pytest.raises(ValueError, match="exceeds the model's max_len 12 .*rope or none runs longer"):
        model(torch.zeros(1, 24, dtype=torch.long))
    torch.manual_seed(0)
    a = Transformer(ModelConfig(embed_dim=16, num_heads=2), 11, 12)
    torch.manual_seed(0)
    b = Transformer(ModelConfig(embed_dim=16, num_heads=2, position="learned"), 11, 12)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_rope_scores_depend_on_the_distance_alone():
    """q at position t and k at s score the same as at t + d and s + d: rotary positions are relative."""
    D, d = 8, 5
    q, k = torch.randn(D, dtype=torch.float64), torch.randn(D, dtype=torch.float64)
    T = 12
    seq_q, seq_k = torch.randn(1, 1, T + d, D, dtype=torch.float64), torch.randn(1, 1, T + d, D, dtype=torch.float64)
    seq_q[..., 3, :], seq_k[..., 1, :] = q, k  # t = 3, s = 1
    seq_q[..., 3 + d, :], seq_k[..., 1 + d, :] = q, k  # shifted by d
    rq, rk = rotate(seq_q)[0, 0], rotate(seq_k)[0, 0]
    torch.testing.assert_close(rq[3] @ rk[1], rq[3 + d] @ rk[1 + d])
    assert not torch.isclose(rq[3] @ rk[1], rq[3] @ rk[1 + d])  # another distance, another score
    torch.testing.assert_close(rq.norm(dim=-1), seq_q[0, 0].norm(dim=-1))  # a rotation: norms unchanged
    torch.testing.assert_close(rotate(seq_q)[..., 0, :], seq_q[..., 0, :])  # position 0 is not turned


def test_rope_rotates_the_two_halves_by_the_standard_angles():
    D, t = 4, 3
    x = torch.zeros(1, 1, t + 1, D, dtype=torch.float64)
    x[..., t, 0] = 1.0  # dim 0, paired with dim 2, frequency 1
    x[..., t, 1] = 1.0  # dim 1, paired with dim 3, frequency 10000^(-2/4) = 0.01
    y = rotate(x)[0, 0, t]
    want = torch.tensor([math.cos(t), math.cos(0.01 * t), math.sin(t), math.sin(0.01 * t)], dtype=torch.float64)
    torch.testing.assert_close(y, want)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("scaling", ["sqrt", "logn", "qknorm"])
def test_rope_fast_and_reference_agree(scaling, causal):
    fast, ref = _pair(scaling, causal, head_dim=4, position="rope")
    x = torch.randn(B, T, C, dtype=torch.float64)
    torch.testing.assert_close(fast(x, _mask("keys"))[0], ref(x, _mask("keys"))[0])


def test_logn_counts_the_real_keys_at_any_length():
    module = MultiHeadAttention(C, H, scaling="logn", causal=True, position="rope").double()
    x = torch.randn(1, 4 * T, C, dtype=torch.float64)
    q, k, _ = module.project(x)
    want = (q @ k.transpose(-2, -1)) * module.attend.scale  # (1, H, 4T, 4T)
    n = torch.arange(1, 4 * T + 1, dtype=torch.float64).view(1, 1, -1, 1)
    want = want * module.attend.logn_scale.view(-1, 1, 1) * n.log()
    want = want.masked_fill(~torch.ones(4 * T, 4 * T, dtype=torch.bool).tril(), float("-inf"))
    torch.testing.assert_close(module.logits(x), want)


@pytest.mark.parametrize("num_classes", [None, 10])
def test_rope_adds_no_flops_to_what_torch_counts(num_classes):
    from torch.utils.flop_counter import FlopCounterMode

    cfg = ModelConfig(embed_dim=24, num_heads=3, num_layers=2, position="rope", backend="manual")
    V, T_, B_ = 13, 9, 2
    with FlopCounterMode(display=False) as counter:
        Transformer(cfg, V, T_, num_classes)(torch.randint(0, V, (B_, T_))).float().sum().backward()
    assert counter.get_total_flops() == B_ * flops_per_sequence(cfg, V, T_, num_classes)
    assert flops_per_sequence(cfg, V, T_, num_classes) == flops_per_sequence(
        dataclasses.replace(cfg, position="learned"), V, T_, num_classes)


def test_bad_position_configurations_raise_clear_errors():
    assert POSITIONS == ("learned", "rope", "none")
    with pytest.raises(ValueError, match="unknown position 'alibi'"):
        MultiHeadAttention(8, 2, position="alibi")
    with pytest.raises(ValueError, match="head_dim must be even, got 3"):
        MultiHeadAttention(8, 2, head_dim=3, position="rope")
    with pytest.raises(ConfigError, match="^position: rope rotates pairs .* got 5"):
        ModelConfig(embed_dim=10, num_heads=2, position="rope")
    with pytest.raises(ValueError, match="position='none' needs a causal model"):
        Transformer(ModelConfig(embed_dim=16, num_heads=2, position="none"), 11, 12, num_classes=10)
    classifier = Transformer(ModelConfig(embed_dim=16, num_heads=2, position="rope"), 11, 12, num_classes=10)
    assert classifier(torch.randint(1, 11, (2, 48))).shape == (2, 10)  # rope classifies longer input too


# --- the recurrent baseline (model.kind lstm, gru) ---------------------------------------------------------------

RNN_SHAPES = [{}, {"embed_dim": 16, "num_heads": 2, "num_layers": 1, "bias": False},
              {"embed_dim": 24, "num_heads": 3, "head_dim": 6, "mlp_ratio": 2.7, "num_layers": 3, "scaling": "qknorm",
               "position": "rope"},
              {"embed_dim": 32, "num_heads": 1, "mlp_ratio": 0, "tie_head": False, "init": "torch"}]  # fmt: skip


@pytest.mark.parametrize("shape", RNN_SHAPES)
@pytest.mark.parametrize("num_classes", [None, 10])
def test_param_count_is_the_built_models_and_the_rnn_matches_the_transformer(shape, num_classes):
    """``sizes.param_count`` is exact for every kind; the matched hidden size (``rnn_hidden_size``) brings an
    RNN within about 1 / h of the Transformer's parameters (a step of h moves about 2 / h of them)."""
    from ablate.core.sizes import param_count, rnn_hidden_size

    base = ModelConfig(**shape)
    V, T = 65, 32
    want = count_params(build_model(base, V, T, num_classes))
    assert param_count(base, V, T, num_classes) == want
    for kind in ("lstm", "gru"):
        cfg = dataclasses.replace(base, kind=kind)
        model = build_model(cfg, V, T, num_classes)
        h = rnn_hidden_size(cfg, T)
        assert isinstance(model, RecurrentNet) and model.hidden_size == model.rnn.hidden_size == h
        assert count_params(model) == param_count(cfg, V, T, num_classes)
        assert abs(count_params(model) - want) / want < 1.5 / h
        if not shape:  # the default study's base (h 156 to 187): within 1%
            assert abs(count_params(model) - want) / want < 0.01
        for other in (h - 1, h + 1):  # nothing closer
            near = count_params(build_model(dataclasses.replace(cfg, rnn_hidden=other), V, T, num_classes))
            assert abs(near - want) >= abs(count_params(model) - want)
    fixed = build_model(dataclasses.replace(base, kind="gru", rnn_hidden=base.embed_dim), V, T, num_classes)
    assert fixed.hidden_size == base.embed_dim and isinstance(fixed.out_proj, nn.Identity)  # no projection at h = C


@pytest.mark.filterwarnings("ignore:TF32 acceleration")
@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("num_classes", [None, 10])
def test_rnn_flops_are_what_torch_counts_forward_and_backward(kind, num_classes):
    """Against ``FlopCounterMode`` with oneDNN off: torch's fused CPU LSTM kernel (oneDNN) is counted as 0 FLOPs,
    its reference path as the matmuls it runs. torch skips the gradient of the zero initial state (2 g h^2 per
    layer and sequence), which the formula keeps."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = ModelConfig(embed_dim=24, num_heads=3, num_layers=2, kind=kind)
    V, T_, B_ = 13, 9, 2
    model = build_model(cfg, V, T_, num_classes)
    g, h = {"lstm": 4, "gru": 3}[kind], model.hidden_size
    with torch.backends.mkldnn.flags(enabled=False), FlopCounterMode(display=False) as counter:
        model(torch.randint(0, V, (B_, T_))).float().sum().backward()
    skipped = B_ * cfg.num_layers * 2 * g * h * h
    assert counter.get_total_flops() + skipped == B_ * flops_per_sequence(cfg, V, T_, num_classes)
    weights = g * h * (24 + h) + g * h * (2 * h) + h * 24 + (V * 24 if num_classes is None else 0)  # by hand
    assert flops_per_sequence(cfg, V, T_, num_classes) == T_ * 6 * weights + (6 * 24 * 10 if num_classes else 0)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_rnn_is_causal_runs_any_length_and_classifies_from_the_last_real_token(kind):
    cfg = ModelConfig(embed_dim=16, num_heads=2, num_layers=2, kind=kind)
    lm = build_model(cfg, vocab_size=11, max_len=12).eval()
    tokens = torch.randint(0, 11, (2, 48))  # 4 x max_len: no position limit
    changed = tokens.clone()
    changed[:, 6] = (changed[:, 6] + 1) % 11
    with torch.no_grad():
        a, b = lm(tokens), lm(changed)
    assert lm.extrapolates and a.shape == (2, 48, 11)
    torch.testing.assert_close(a[:, :6], b[:, :6], rtol=0, atol=0)
    assert (a[:, 6:] - b[:, 6:]).abs().amax() > 1e-4
    clf = build_model(cfg, vocab_size=11, max_len=10, num_classes=3).eval()
    short, real, long, long_real = padded_pair()
    with torch.no_grad():
        torch.testing.assert_close(clf(short, real), clf(long, long_real))  # padding after the last real token
        cut = clf(short[1:, :4])  # the same sample without its padding
        torch.testing.assert_close(clf(short, real)[1:], cut)


def test_model_kinds_are_built_by_build_model_and_checked():
    assert isinstance(build_model(ModelConfig(embed_dim=16, num_heads=2), 11, 8), Transformer)
    with pytest.raises(ValueError, match="model.kind 'lstm' is no transformer: build it with build_model"):
        Transformer(ModelConfig(embed_dim=16, num_heads=2, kind="lstm"), 11, 8)
    with pytest.raises(ConfigError, match="^rnn_hidden: must be >= 1, got 0"):
        ModelConfig(kind="gru", rnn_hidden=0)
    with pytest.raises(ConfigError, match="^model.kind: unknown value 'rnn'; allowed: transformer, lstm, gru"):
        run_config_from({"model": {"kind": "rnn"}})
    assert ModelConfig(kind="lstm", position="none").kind == "lstm"  # attention fields are ignored, not refused


def test_attention_only_untied_and_torch_initialised_models_are_what_they_say():
    """mlp_ratio 0: blocks without MLP (nor its LayerNorm); tie_head false: the head has its own weights; init torch:
    each layer as torch builds it (nn.Embedding N(0, 1), not GPT-2's N(0, 0.02)). FLOPs drop the MLP's matmuls."""
    from ablate.core.sizes import flops_per_sequence

    toy = ModelConfig(embed_dim=32, num_heads=1, mlp_ratio=0, tie_head=False, init="torch")
    torch.manual_seed(0)
    model = build_model(toy, 33, 16)
    assert all(block.mlp is None and not hasattr(block, "ln_2") for block in model.blocks)
    assert model.head.weight is not model.tok_emb.weight
    assert 0.8 < model.tok_emb.weight.std().item() < 1.2  # torch's N(0, 1), where gpt2 draws std 0.02
    assert model(torch.randint(0, 33, (2, 16))).shape == (2, 16, 33)
    gpt2 = build_model(ModelConfig(embed_dim=32, num_heads=1), 33, 16)
    assert gpt2.head.weight is gpt2.tok_emb.weight and gpt2.tok_emb.weight.std().item() < 0.03
    with_mlp = dataclasses.replace(toy, mlp_ratio=4.0)
    assert flops_per_sequence(with_mlp, 33, 16) - flops_per_sequence(toy, 33, 16) == 16 * 6 * 2 * 2 * 32 * 128
    with pytest.raises(ConfigError, match="^mlp_ratio: must be >= 0"):
        ModelConfig(mlp_ratio=-1)
    with pytest.raises(ConfigError, match="^model.init: unknown value 'xavier'; allowed: gpt2, torch"):
        run_config_from({"model": {"init": "xavier"}})
