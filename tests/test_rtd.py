"""The RTD step's pieces on their own: the MLM loss, masking edge cases, the enhanced mask decoder, and
a step that never reads a value back to the host."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lab.model import preset
from lab.rtd import RTDHead, RTDModel, draw_noise, mask_counts, mask_tokens, masked_lm_loss

CFG = preset("tiny", hidden_dropout=0.0, attention_dropout=0.0)


def test_masked_lm_loss_equals_a_float64_literal_forward_and_gradient():
    g = torch.Generator().manual_seed(0)
    B, K, V = 3, 5, 1000
    logits = (torch.randn(B, K, V, generator=g) * 4).requires_grad_()
    targets = torch.randint(0, V, (B, K), generator=g)
    valid = torch.rand(B, K, generator=g) < 0.7
    loss = masked_lm_loss(logits, targets, valid)
    (grad,) = torch.autograd.grad(loss, logits)

    x = logits.detach().double().requires_grad_()
    per_slot = [
        torch.logsumexp(x[b, k], 0) - x[b, k, targets[b, k]]
        for b in range(B)
        for k in range(K)
        if valid[b, k]
    ]
    ref = torch.stack(per_slot).mean()
    (ref_grad,) = torch.autograd.grad(ref, x)
    assert abs(loss.item() - ref.item()) < 1e-5
    assert (grad.double() - ref_grad).abs().max() < 1e-5
    assert (grad[~valid] == 0).all()  # unused slots contribute nothing


# -- masking --------------------------------------------------------------------------------------


def test_bert_random_tokens_come_from_the_non_special_ids_wherever_the_specials_sit():
    """A vocabulary whose [MASK] (id 4) is not the last id, and one with specials scattered inside."""
    for special, mask_id in (([0, 1, 2, 3, 4], 4), ([0, 1, 2, 3, 10, 20], 10)):
        special_ids = torch.tensor(special)
        V = 50
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, V, (400, 64), generator=g)
        ids[torch.isin(ids, special_ids)] = 30
        mask = torch.ones_like(ids)
        noise = draw_noise(*ids.shape, 0.15, g, "cpu")
        noise.mix.fill_(0.85)  # every chosen slot takes the "random token" branch
        masked, positions, valid = mask_tokens(ids, mask, special_ids, mask_id, noise, 0.15, "bert", V)
        drawn = masked.gather(1, positions)[valid]
        words = sorted(set(range(V)) - set(special))
        assert not torch.isin(drawn, special_ids).any(), f"a special id was drawn ({special})"
        counts = torch.bincount(drawn, minlength=V)[words].float()
        assert (counts > 0).all(), "some non-special ids are never drawn"
        assert counts.max() / counts.mean() < 1.6  # roughly uniform over the words (~90 draws each)


def official_count(length: int, words: int, mask_prob: float = 0.15) -> int:
    """microsoft/DeBERTa NGramMaskGenerator (max_gram=1), transcribed: num_to_predict from the row's
    length in float64 with Python's round, then one token per window of int(1 / p) words."""
    num_to_predict = max(1, int(round(length * mask_prob)))
    windows = math.ceil(words / int(1 / mask_prob))
    return min(num_to_predict, windows)


def rows_of(lengths_and_words, T):
    """One row per (L, U): [CLS], U words, L - U - 2 [UNK] (special) tokens, [SEP], padding to T."""
    ids = torch.zeros(len(lengths_and_words), T, dtype=torch.long)
    for i, (L, U) in enumerate(lengths_and_words):
        ids[i, :L] = torch.tensor([1] + [10 + j % 50 for j in range(U)] + [3] * (L - U - 2) + [2])
    return ids, (ids != 0).long()


def test_mask_count_is_the_official_rule_in_exact_integers():
    """Pinned by hand where round, floor and ceil of 0.15 L differ: L = 17 (2.55: round 3, floor 2),
    L = 7 (1.05: round 1, ceil 2), ties to even at L = 10 (1.5 -> 2), 30 (4.5 -> 4), 190 (28.5 -> 28)
    and 350 (52.5 -> 52; float32 gives 53), and the window cap (U = 3 words of L = 12: one window)."""
    special = torch.tensor([0, 1, 2, 3, 99])
    cases = {(17, 15): 3, (7, 5): 1, (10, 8): 2, (30, 28): 4, (190, 188): 28, (350, 348): 52, (12, 3): 1}
    cases |= {(3, 1): 1, (5, 3): 1, (4, 0): 0, (8, 6): 1}  # short rows: at least one, none without words
    ids, mask = rows_of(list(cases), 360)
    assert mask_counts(ids, mask, special, 0.15).tolist() == list(cases.values())
    noise = draw_noise(*ids.shape, 0.15, torch.Generator().manual_seed(0), "cpu")
    masked, positions, valid = mask_tokens(ids, mask, special, 99, noise, 0.15)
    assert (masked == 99).sum(1).tolist() == valid.sum(1).tolist() == list(cases.values())
    assert torch.equal(masked[list(cases).index((4, 0))], ids[list(cases).index((4, 0))])


def test_mask_count_matches_the_official_float64_rule_for_every_length():
    """Full rows of every length up to 600 and rows with a few specials inside, at three rates."""
    special = torch.tensor([0, 1, 2, 3, 99])
    for p in (0.15, 0.1, 0.25):
        shapes = [(L, L - 2) for L in range(3, 601)] + [(L, L - 2 - L // 9) for L in range(3, 601)]
        ids, mask = rows_of(shapes, 600)
        expected = [official_count(L, U, p) for L, U in shapes]
        assert mask_counts(ids, mask, special, p).tolist() == expected, p


def test_one_token_is_masked_per_window_of_words_in_the_first_windows():
    """NGramMaskGenerator draws one word in each window of int(1 / p) = 6 consecutive words and keeps
    the first num_to_predict of them: the masked words' ranks fall one in each of windows 0..n-1, and
    over many draws every offset inside a window is used about equally."""
    special = torch.tensor([0, 1, 2, 3, 99])
    ids, mask = rows_of([(128, 120)] * 300, 128)  # 120 words and 6 interior specials: 19 of 20 windows
    noise = draw_noise(*ids.shape, 0.15, torch.Generator().manual_seed(3), "cpu")
    masked, _, _ = mask_tokens(ids, mask, special, 99, noise, 0.15)
    word = mask.bool() & ~torch.isin(ids, special)
    rank = word.long().cumsum(1) - 1  # each word's rank among its row's words
    ranks = [rank[b][masked[b] == 99] for b in range(len(ids))]
    for r in ranks:
        assert sorted((r // 6).tolist()) == list(range(19))
    offsets = torch.bincount(torch.cat(ranks) % 6, minlength=6).float()
    assert offsets.min() / offsets.max() > 0.85  # ~950 draws per offset


# -- the enhanced mask decoder --------------------------------------------------------------------


@pytest.mark.parametrize("gen_layers", [1, 2])
def test_enhanced_mask_decoder_reads_h_n_minus_1(gen_layers):
    """EMD: the generator's last layer applied twice with keys/values H_{n-1} and query H_{n-1} + P_abs,
    where H_0 is the embedding output (so a one-layer generator decodes from the embeddings)."""
    cfg = preset("tiny", num_layers=2 * gen_layers, hidden_dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    model = RTDModel(cfg, "nes", gen_depth_ratio=0.5, emd=True).eval()
    assert len(model.generator.layers) == gen_layers
    ids = torch.randint(4, cfg.vocab_size - 1, (2, 12))
    ids[:, 0], ids[:, -1] = 1, 2
    attention_mask = torch.ones_like(ids)
    attention_mask[1, 9:] = 0
    special, mask_id = torch.tensor([0, 1, 2, 3, cfg.vocab_size - 1]), cfg.vocab_size - 1
    noise = draw_noise(*ids.shape, 0.15, torch.Generator().manual_seed(1), "cpu")
    with torch.no_grad():
        out = model(ids, attention_mask, special, mask_id, noise=noise)
        # the decoder written out, layer by layer
        masked_ids, _, _ = mask_tokens(ids, attention_mask, special, mask_id, noise, 0.15)
        gen = model.generator
        states = [gen.embed(masked_ids, attention_mask)]
        for _ in gen.layers:
            states.append(gen(masked_ids, attention_mask, return_all=True)[len(states) - 1])
        context = states[gen_layers - 1]  # H_{n-1}
        rel, index = gen.relative_positions(12, ids.device)
        bias = (1.0 - attention_mask[:, None, None, :].float()) * -1e30
        query = context + model.emd.position_embeddings.weight[:12]
        for _ in range(2):
            query = gen.layers[-1](context, rel, index, bias, query=query)
        picked = query.gather(1, out.positions[..., None].expand(-1, -1, cfg.hidden_size))
        expected = model.mlm_head(picked, model.generator_table)
    torch.testing.assert_close(out.mlm_logits, expected, atol=1e-5, rtol=1e-5)


# -- no host synchronisation ----------------------------------------------------------------------


class HostReads(TorchDispatchMode):
    """Records every operation that would make the host wait on the device: a value read back
    (.item(), .tolist(), bool(t): aten._local_scalar_dense), or a host tensor entering a device op
    (a host-to-device copy, e.g. an index built on the CPU and moved every forward)."""

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            self.found.append(str(func))
        tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if any(t.device.type == "cpu" and t.dim() > 0 for t in tensors):
            self.found.append(f"{func} with a host tensor")
        return func(*args, **kwargs)


@pytest.mark.parametrize("emd", [False, True])
def test_an_rtd_step_reads_nothing_back_to_the_host(emd):
    """Forward and backward on the meta device (a stand-in for an accelerator: no values, so any read
    back or host-built tensor shows up), for the plain generator and the enhanced mask decoder."""
    model = RTDModel(CFG, "gdes", emd=emd).to("meta")
    ids = torch.randint(4, 900, (2, 40)).to("meta")
    attention_mask = torch.ones(2, 40, dtype=torch.long, device="meta")
    special = torch.tensor([0, 1, 2, 3, 999], device="meta")
    with HostReads() as reads:
        out = model(ids, attention_mask, special, 999, mask_strategy="bert")
        out.loss.backward()
    assert reads.found == []
    assert out.mlm_logits.shape == (2, 6, CFG.vocab_size) and out.rtd_logits.shape == (2, 40)


def test_the_rtd_step_compiles_as_one_graph():
    """fullgraph=True: no graph break anywhere in the step (masking, both encoders, EMD, sampling, losses);
    aot_eager traces what inductor would compile, in a fraction of its compile time."""
    torch.manual_seed(0)
    model = RTDModel(CFG, "gdes", emd=True)
    ids = torch.randint(4, 900, (2, 24))
    ids[:, 0], ids[:, -1] = 1, 2
    attention_mask = torch.ones_like(ids)
    attention_mask[1, 18:] = 0
    special = torch.tensor([0, 1, 2, 3, 999])
    noise = draw_noise(*ids.shape, 0.15, torch.Generator().manual_seed(2), "cpu")
    eager = model(ids, attention_mask, special, 999, mask_strategy="bert", noise=noise)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(ids, attention_mask, special, 999, mask_strategy="bert", noise=noise)
    torch.testing.assert_close(out.loss, eager.loss, atol=1e-5, rtol=1e-5)
    assert torch.equal(out.corrupted_ids, eager.corrupted_ids)


def test_rtd_head_adds_the_cls_state_layer_norm_first():
    """logit_i = w · gelu(W · LN(h_i + h_CLS) + b) + c, written out by hand in float64."""
    torch.manual_seed(0)
    head = RTDHead(CFG).double()
    for p in head.parameters():  # non-trivial LayerNorm and biases, so a dropped term shows
        torch.nn.init.normal_(p, std=0.5)
    h = torch.randn(2, 6, CFG.hidden_size, dtype=torch.float64)
    x = h + h[:, :1]  # every token sees the [CLS] state
    x = (x - x.mean(-1, keepdim=True)) / torch.sqrt(
        x.var(-1, unbiased=False, keepdim=True) + CFG.layer_norm_eps
    )
    x = x * head.norm.weight + head.norm.bias
    z = x @ head.dense.weight.T + head.dense.bias
    gelu = 0.5 * z * (1 + torch.erf(z / 2**0.5))
    expected = (gelu @ head.classifier.weight.T + head.classifier.bias).squeeze(-1)
    assert torch.allclose(head(h), expected, atol=1e-10)
    assert not torch.allclose(head(h), head(h - h[:, :1] + h[:, 1:2]), atol=1e-3)  # h_CLS matters


def test_rtd_loss_is_the_bce_mean_over_every_non_pad_token():
    torch.manual_seed(1)
    model = RTDModel(CFG, sharing="gdes").eval()
    ids = torch.randint(4, CFG.vocab_size - 1, (3, 12))
    ids[:, 0] = 1
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # padded tail, with [SEP] before it
    ids[1, 7], ids[1, 8:] = 2, 0
    ids[[0, 2], -1] = 2
    special = torch.tensor([0, 1, 2, 3])
    out = model(ids, mask, special, mask_id=CFG.vocab_size - 1, rtd_weight=50.0)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(out.rtd_logits, out.labels, reduction="none")
    keep = mask.bool()  # [CLS] and [SEP] included, padding excluded
    assert torch.allclose(out.rtd_loss, bce[keep].mean(), atol=1e-6)
    assert not torch.allclose(out.rtd_loss, bce.mean(), atol=1e-6)  # padding would change it
    assert torch.allclose(out.loss, out.mlm_loss + 50.0 * out.rtd_loss)
