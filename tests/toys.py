"""Small random models shared by the decoding tests."""

import itertools

import torch

from mulosd.decoding.sampling import process_logits
from mulosd.models.gpt import GPT, GPTConfig


def toy(dim, layers, seed, grid=2, vocab=3, std=0.6):
    torch.manual_seed(seed)
    m = GPT(GPTConfig(grid_size=grid, dim=dim, n_layer=layers, n_head=2, vocab_size=vocab, num_classes=2)).eval()
    with torch.no_grad():  # larger weights than the 0.02 init, so distributions are far from uniform
        for p in m.parameters():
            if p.ndim == 2:
                p.normal_(0, std)
    return m


@torch.no_grad()
def sequence_distribution(model, label, cfg):
    """Exact probability of every token sequence under the target's sampling distribution, by enumeration."""
    N, V = model.config.num_tokens, model.config.vocab_size
    seqs = torch.tensor(list(itertools.product(range(V), repeat=N)))
    labels = torch.full((len(seqs),), label)
    logits = model(torch.cat([labels, torch.full_like(labels, model.null_class)]) if cfg.uses_cfg else labels,
                   torch.cat([seqs, seqs]) if cfg.uses_cfg else seqs)
    probs = process_logits(logits, cfg)
    return seqs, probs.gather(-1, seqs[..., None]).squeeze(-1).prod(-1)


def assert_matches_distribution(out: torch.Tensor, want: torch.Tensor, vocab: int = 3) -> None:
    """``out`` [n, L] sampled sequences over ``vocab`` symbols follow ``want`` (probabilities of every sequence in
    lexicographic order): no impossible sequence appears and a chi-square test does not reject (p > 1e-3)."""
    from scipy.stats import chisquare

    L = out.shape[1]
    index = (out * (vocab ** torch.arange(L - 1, -1, -1))).sum(-1)
    counts = torch.bincount(index, minlength=vocab**L).double()
    keep = want > 0
    assert counts[~keep].sum() == 0
    expected = want[keep].double() / want[keep].double().sum() * counts[keep].sum()
    assert chisquare(counts[keep].numpy(), expected.numpy()).pvalue > 1e-3
