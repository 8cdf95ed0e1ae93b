"""evaluate(progress=True): a bar of the forward passes on stderr (in-loop evaluation shows one), the same scores."""

from eval import evaluate


def test_progress_bar_counts_batches_and_changes_no_score(model, tokenizer, evaldata, capfd):
    quiet = evaluate(model, tokenizer, ["piqa"], data_dir=evaldata, limit=12, batch_tokens=512)
    capfd.readouterr()
    shown = evaluate(model, tokenizer, ["piqa"], data_dir=evaldata, limit=12, batch_tokens=512, progress=True)
    err = capfd.readouterr().err
    assert shown == quiet
    # The bar is cleared when done (leave=False), so its last drawn state may be short of 100%.
    assert "evaluation:" in err and "batch" in err
