import math

import pytest
import torch

from mulosd.errors import MulosdError
from mulosd.models.gpt import GPT, GPTConfig, rope_2d_table


def tiny(grid=4, **kw):
    cfg = dict(grid_size=grid, dim=32, n_layer=2, n_head=4, vocab_size=17, num_classes=3)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).eval()


@torch.no_grad()
def test_incremental_decoding_equals_full_forward():
    m = tiny()
    labels, toks = torch.tensor([0, 2, 3]), torch.randint(0, 17, (3, 16))
    full = m(labels, toks)
    m.setup_cache(3)
    inc = [m.prefill(labels)]
    for k in range(15):
        inc.append(m.decode(toks[:, k : k + 1], torch.full((3, 1), k))[:, 0])
    assert torch.allclose(full, torch.stack(inc, 1), atol=1e-5, rtol=0)


@torch.no_grad()
def test_chunked_and_per_sample_positions():
    """Samples at different frontiers, fed chunks of different cells in one call, match the full forward."""
    m = tiny(n_kv_head=2)
    labels, toks = torch.tensor([1, 2]), torch.randint(0, 17, (2, 16))
    full = m(labels, toks)
    m.setup_cache(2)
    m.prefill(labels)
    m.decode(toks[:, :3], torch.arange(3).expand(2, 3))  # both at cell 3
    m.decode(toks[1:2, 3:9].expand(2, -1).clone(), torch.stack([torch.arange(3, 9)] * 2))  # sample 0 gets junk for 3..8
    # sample 0 rewinds: rewrites cells 3..5 with its real tokens (rollback = not advancing + overwrite)
    out0 = m.decode(torch.stack([toks[0, 3:6], toks[1, 9:12]]), torch.stack([torch.arange(3, 6), torch.arange(9, 12)]))
    assert torch.allclose(out0[0], full[0, 4:7], atol=1e-5)
    assert torch.allclose(out0[1], full[1, 10:13], atol=1e-5)


@torch.no_grad()
def test_rewriting_arbitrary_cells_equals_recomputation():
    """Rewrite scattered cells (different per sample), then refresh the cells after the first rewrite in one
    forward: every logit equals a cache-free recomputation of the edited sequence. Slots written with stale
    context before that refresh are invisible to queries at earlier positions."""
    m = tiny()
    ref = tiny()
    ref.load_state_dict(m.state_dict())
    labels = torch.tensor([0, 1])
    toks = torch.randint(0, 17, (2, 16))
    m.setup_cache(2)
    m.prefill(labels)
    m.decode(toks[:, :15], torch.arange(15).expand(2, 15))
    cells = torch.tensor([[2, 7, 11], [5, 9, 13]])
    new = torch.randint(0, 17, (2, 3))
    edited = toks.clone().scatter_(1, cells, new)
    want = ref(labels, edited)
    # scattered writes only (no refresh yet): queries before the first rewritten cell are unaffected
    m.decode(new, cells)
    early = m.decode(edited[:, :2], torch.arange(2).expand(2, 2))
    assert torch.allclose(early, want[:, 1:3], atol=1e-5)
    # refresh from each sample's first rewritten cell to the end, per-sample positions in one call
    first = cells.min(1).values
    span = 15 - first.max()
    pos = torch.stack([torch.arange(f, f + span) for f in first.tolist()])
    out = m.decode(edited.gather(1, pos), pos)
    assert torch.allclose(out, want.gather(1, (pos + 1)[..., None].expand(-1, -1, 17)), atol=1e-5)


def test_rope_table_matches_llamagen_definition():
    grid, hd, base, cls = 3, 8, 10000.0, 2
    table = rope_2d_table(grid, hd, base, cls)
    assert table.shape == (cls + grid * grid, hd // 2, 2)
    assert (table[:cls] == 0).all()  # condition positions: zero rotary table
    for cell in range(grid * grid):
        r, c = divmod(cell, grid)
        for j in range(hd // 4):
            f = 1.0 / base ** (2 * j / (hd // 2))
            assert math.isclose(table[cls + cell, j, 0].item(), math.cos(r * f), abs_tol=1e-6)
            assert math.isclose(table[cls + cell, hd // 4 + j, 1].item(), math.sin(c * f), abs_tol=1e-6)


def test_config_validation():
    with pytest.raises(MulosdError, match="divisible"):
        GPTConfig(dim=30, n_head=4)
    with pytest.raises(MulosdError, match="multiple of 4"):
        GPTConfig(dim=24, n_head=4)
