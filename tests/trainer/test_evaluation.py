"""Evaluation: recall@k, ITM re-ranking of the ITC top-k, sample captions, and ZeRO-3-safe (fixed) module
traffic."""

from __future__ import annotations

import pytest
import torch

from tests.trainer.test_objectives import _texts, make_model
from trainer import evaluation
from trainer.evaluation import evaluate, recall_at_k, rerank_top_k, retrieval_metrics, sample_captions


pytestmark = pytest.mark.usefixtures("one_thread")


def make_eval_set(n_images: int = 6, per_image: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids, mask = _texts(g, n_images * per_image, 10, 1024)
    return {"pixels": torch.randn(n_images, 3, 32, 32, generator=g), "input_ids": ids, "attention_mask": mask,
            "text_image_index": torch.arange(n_images).repeat_interleave(per_image)}


def trace_modules(model, fn) -> list[str]:
    names = {m: n for n, m in model.named_modules()}
    calls: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda mod, a: calls.append(names[mod])) for m in names]
    try:
        fn()
    finally:
        for h in hooks:
            h.remove()
    return calls


def test_recall_at_k_counts_the_best_positive():
    sim = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.3, 0.8], [0.7, 0.6, 0.1]])
    pos = torch.tensor([[1, 0, 0], [1, 0, 0], [0, 1, 1]], dtype=torch.bool)
    r = recall_at_k(sim, pos, ks=(1, 2, 3))
    assert r == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3), 3: 1.0}


def test_a_held_out_set_with_one_sample_per_caption_scores_as_one_with_every_caption_per_image():
    """COCO's layout: five samples per image sharing its id, so each image appears once per caption. A
    caption's own image's other copies are right answers, not wrong ones, and the chance level counts images:
    recall equals that of the same set grouped (one row per image)."""
    g = torch.Generator().manual_seed(0)
    n_images, per_image = 6, 2
    img = torch.nn.functional.normalize(torch.randn(n_images, 8, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(img.repeat_interleave(per_image, 0)
                                        + 0.9 * torch.randn(n_images * per_image, 8, generator=g), dim=-1)
    grouped = {"pixels": torch.zeros(n_images, 3, 4, 4),
               "text_image_index": torch.arange(n_images).repeat_interleave(per_image)}
    per_caption = {"pixels": torch.zeros(n_images * per_image, 3, 4, 4),
                   "text_image_index": torch.arange(n_images * per_image),
                   "image_ids": torch.arange(n_images).repeat_interleave(per_image) + 100}
    by_image = retrieval_metrics(None, grouped, features=(txt, img))
    by_caption = retrieval_metrics(None, per_caption, features=(txt, img.repeat_interleave(per_image, 0)))
    assert by_caption["eval/t2i_R@1"] == by_image["eval/t2i_R@1"] < 1.0
    assert by_caption["eval/candidates"] == by_image["eval/candidates"] == n_images


def test_rerank_orders_the_top_k_by_the_scorer_and_keeps_the_rest_below():
    sim = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5], [0.1, 0.2, 0.3, 0.4, 0.5]])
    pos = torch.zeros(2, 5, dtype=torch.bool)
    pos[0, 2] = True  # inside row 0's ITC top-3
    pos[1, 0] = True  # outside row 1's ITC top-3: re-ranking cannot reach it
    oracle = lambda q, c: pos[q, c].float()
    out = rerank_top_k(sim, 3, oracle)
    assert recall_at_k(sim, pos, ks=(1,))[1] == 0.0
    assert recall_at_k(out, pos, ks=(1, 4, 5)) == {1: 0.5, 4: 0.5, 5: 1.0}
    assert out[1, 1] > out[1, 0]  # outside the top-k the ITC order stays


def test_retrieval_with_itm_reranking_reports_both(monkeypatch):
    model, ev = make_model(), make_eval_set()
    plain = retrieval_metrics(model, ev)
    both = retrieval_metrics(model, ev, rerank_k=3)
    for key, value in plain.items():
        assert both[key] == value
    for d in ("i2t", "t2i"):
        for k in (1, 5, 10):
            assert 0.0 <= both[f"eval/itm_{d}_R@{k}"] <= 1.0
    # with k = all candidates and an oracle ITM, re-ranked R@1 is perfect: the scores really drive the order
    truth = ev["text_image_index"]
    monkeypatch.setattr(evaluation, "itm_scores", lambda m, e, im, tx, **kw: (truth[tx] == im).float())
    oracle = retrieval_metrics(model, ev, rerank_k=ev["input_ids"].shape[0])
    assert oracle["eval/itm_i2t_R@1"] == 1.0 and oracle["eval/itm_t2i_R@1"] == 1.0


def test_evaluation_runs_the_same_modules_whatever_the_weights():
    """ZeRO-3: ranks run evaluation together, so its module calls must not depend on the scores."""
    ev = make_eval_set()
    traces = []
    for seed in (0, 1):
        model = make_model(seed)
        traces.append(trace_modules(model, lambda m=model: evaluate(m, ev, rerank_k=2, caption_images=2)))
    assert traces[0] == traces[1]
    assert any(n.startswith("itm_head") for n in traces[0]) and any(n == "lm_fused_head" for n in traces[0])


def test_captions_cut_at_the_end_token_and_decode(monkeypatch):
    model = make_model()
    eos = model.cfg.text.eos_token_id
    fake = torch.tensor([[7, 8, eos, 9], [5, 6, 7, 8]])
    seen = {}

    def fake_generate(m, pixels, max_new_tokens, eos_token_id):
        seen["eos"] = eos_token_id
        return fake[: pixels.shape[0]]

    monkeypatch.setattr(evaluation, "generate", fake_generate)
    out = sample_captions(model, torch.zeros(2, 3, 32, 32), decode=lambda ids: "-".join(map(str, ids)))
    assert out == ["7-8", "5-6-7-8"]
    assert seen["eos"] not in range(model.cfg.text.vocab_size)  # decoding never stops early on any rank


def test_real_captions_have_the_asked_length_at_most():
    model = make_model()
    ev = make_eval_set()
    _, caps = evaluate(model, ev, caption_images=3)
    assert len(caps) == 3 and all(isinstance(c, list) and len(c) <= evaluation.CAPTION_TOKENS for c in caps)


def test_top_k_accuracy_counts_any_true_class_among_the_k_best():
    sim = torch.tensor([[0.9, 0.5, 0.1], [0.1, 0.2, 0.7], [0.3, 0.8, 0.6]])
    labels = torch.tensor([[1, 0, 0], [1, 0, 0], [0, 0, 1]], dtype=torch.bool)
    acc = evaluation.top_k_accuracy(sim, labels, ks=(1, 2, 5))  # k beyond the class count means every class
    assert acc == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3), 5: 1.0}


def test_zero_shot_metrics_average_prompts_per_class_and_leave_unlabelled_images_out():
    # class 0 has two prompts whose mean points along x; class 1's single prompt along y
    prompts = torch.nn.functional.normalize(torch.tensor([[1.0, 0.3], [1.0, -0.3], [0.0, 1.0]]), dim=-1)
    prompt_class = torch.tensor([0, 0, 1])
    images = torch.nn.functional.normalize(torch.tensor([[1.0, 0.1], [0.1, 1.0], [1.0, 0.0]]), dim=-1)
    labels = torch.tensor([[1, 0], [0, 1], [0, 0]], dtype=torch.bool)  # the third image has no class
    m = evaluation.zero_shot_metrics(images, prompts, prompt_class, labels)
    assert m["eval/zeroshot_top1"] == 1.0 and m["eval/zeroshot_top5"] == 1.0
    assert m["eval/zeroshot_images"] == 2 and m["eval/zeroshot_unlabelled"] == 1
    wrong = evaluation.zero_shot_metrics(images, prompts, prompt_class, labels.flip(1))
    assert wrong["eval/zeroshot_top1"] == 0.0


def test_encode_texts_equals_the_text_half_of_itc_features(one_thread):
    model = make_model().eval()
    es = make_eval_set()
    txt, _ = evaluation.encode_eval_set(model, es, batch_size=4)
    assert torch.allclose(evaluation.encode_texts(model, es["input_ids"], es["attention_mask"], 5), txt,
                          atol=1e-6)


def test_progress_counts_every_item_retrieval_metrics_works_through():
    model = make_model().eval()
    es = make_eval_set()
    seen = []
    retrieval_metrics(model, es, rerank_k=3, progress=seen.append)
    assert sum(seen) == evaluation.retrieval_work(es, rerank_k=3) == 12 + 6 + 6 * 3 + 12 * 3


def test_evaluation_reads_no_parameter_outside_the_module_owning_it():
    """Under ZeRO-3 a parameter is gathered while a module holding it runs, and the objectives module, on
    which the trainer registers the parameters read elsewhere, does not run in evaluation: retrieval,
    re-ranking and captions must read every parameter inside its own module (the token-type table's row 0 had
    been read directly, which failed under per-module ZeRO-3 once that table was partitioned)."""
    from trainer.zero3_external_params import external_reads

    model, ev = make_model().eval(), make_eval_set()
    with torch.no_grad():
        assert external_reads(model, lambda: evaluate(model, ev, rerank_k=2, caption_images=2)) == set()
