"""generate(): deterministic greedy and beam search, EOS handling and length limits."""

import pytest
import torch

from model.flavors import get_flavor
from model.generate import generate
from model.unimo import UnimoModel

EOS = 102


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = UnimoModel(get_flavor("debug"))
    with torch.no_grad():  # spread the tied embeddings so different images give different captions
        m.text.embeddings.word.weight.normal_(std=1.0)
    return m


@pytest.fixture
def pixels():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("beams", [1, 3])
def test_caption_deterministic_and_bounded(model, pixels, beams):
    a = generate(model, pixels=pixels, max_new_tokens=7, num_beams=beams)
    b = generate(model, pixels=pixels, max_new_tokens=7, num_beams=beams)
    assert torch.equal(a, b)
    assert a.shape[0] == 3 and 1 <= a.shape[1] <= 7
    assert (a >= 0).all() and (a < 1024).all()


def test_greedy_is_argmax(model, pixels):
    out = generate(model, pixels=pixels[:1], max_new_tokens=3, eos_token_id=1023)
    ids = torch.tensor([[101]])
    model.eval()
    with torch.no_grad():
        vs = model.encode_image(pixels[:1])
        for step in range(3):
            mask = torch.ones_like(ids)
            t, _ = model.fuse(model.encode_text(ids, mask, "causal"), mask, vs, text_causal=True)
            logits = model.lm_logits_fused(t)[0, -1]
            logits[0] = float("-inf")  # pad is never generated
            ids = torch.cat([ids, logits.argmax().view(1, 1)], dim=1)
    assert torch.equal(out, ids[:, 1:])


def test_stops_at_eos(model, pixels):
    with torch.no_grad():
        model.lm_fused_head.decoder.bias[EOS] += 100.0  # EOS is always the best next token
    try:
        for beams in (1, 2):
            out = generate(model, pixels=pixels, max_new_tokens=10, num_beams=beams)
            assert out.tolist() == [[EOS]] * 3
    finally:
        with torch.no_grad():
            model.lm_fused_head.decoder.bias[EOS] -= 100.0


def test_eos_mid_sequence_pads_after(model, pixels):
    first = generate(model, pixels=pixels, max_new_tokens=6)
    eos = int(first[0, 2])  # pretend row 0's third token is EOS
    out = generate(model, pixels=pixels, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    row = out[0].tolist()
    assert row[:3] == first[0, :3].tolist()
    assert all(t == 0 for t in row[3:])


def test_beam_search_scores_at_least_greedy(model, pixels):
    def logprob(seq, px):
        ids = torch.cat([torch.tensor([[101]]), seq], dim=1)
        mask = torch.ones_like(ids)
        with torch.no_grad():
            vs = model.encode_image(px)
            t, _ = model.fuse(model.encode_text(ids, mask, "causal"), mask, vs, text_causal=True)
            lp = model.lm_logits_fused(t).log_softmax(-1)
        return lp[0, :-1].gather(-1, ids[0, 1:, None]).sum().item()

    g = generate(model, pixels=pixels[:1], max_new_tokens=4, eos_token_id=1023)
    b = generate(model, pixels=pixels[:1], max_new_tokens=4, num_beams=4, eos_token_id=1023)
    assert logprob(b, pixels[:1]) >= logprob(g, pixels[:1]) - 1e-5


def test_text_continuation_with_padded_prompts(model):
    ids = torch.randint(200, 1000, (2, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    out = generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=5, num_beams=2)
    assert out.shape[0] == 2 and out.shape[1] <= 5
    # the same prompt alone gives the same continuation (padding does not leak)
    alone = generate(model, input_ids=ids[1:, :4], max_new_tokens=5, num_beams=2)
    assert torch.equal(out[1, : alone.shape[1]], alone[0])
    # left-padded prompts are moved right
    left = torch.cat([torch.zeros(1, 2, dtype=torch.long), ids[1:, :4]], dim=1)
    lmask = torch.tensor([[0, 0, 1, 1, 1, 1]])
    assert torch.equal(generate(model, input_ids=left, attention_mask=lmask, max_new_tokens=5, num_beams=2),
                       alone)


def test_generate_restores_training_mode_and_validates(model, pixels):
    model.train()
    generate(model, pixels=pixels, max_new_tokens=2)
    assert model.training
    with pytest.raises(ValueError):
        generate(model)
    with pytest.raises(ValueError):
        generate(model, input_ids=torch.ones(1, 64, dtype=torch.long), max_new_tokens=3)
