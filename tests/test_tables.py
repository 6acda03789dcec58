"""The store's tables: table.csv stays the long table scripts compare; table.md is shaped like the paper's tables."""

import pandas as pd

from eval.report.tables import paper_markdown, run_table, write_table


def _frame():
    base = {"model": "scene_llava", "n_samples": 600, "record": "r.json"}
    rows = [
        {**base, "benchmark": "scene_pope", "task": "hiprune_scene_pope", "method": "none", "budget": None,
         "kept_tokens_per_image": 64.0, "pope_f1_score": 0.96774, "pope_accuracy": 0.96833},
        {**base, "benchmark": "scene_qa", "task": "hiprune_scene_qa", "method": "none", "budget": None,
         "kept_tokens_per_image": 64.0, "exact_match": 0.88833},
        {**base, "benchmark": "scene_pope", "task": "hiprune_scene_pope", "method": "hiprune", "budget": 8,
         "kept_tokens_per_image": 8.0, "pope_f1_score": 0.82183, "pope_accuracy": 0.84167},
        {**base, "benchmark": "scene_pope", "task": "hiprune_scene_pope", "method": "hiprune", "budget": 32,
         "kept_tokens_per_image": 32.0, "pope_f1_score": 0.9454, "pope_accuracy": 0.94667},
        {**base, "benchmark": "scene_qa", "task": "hiprune_scene_qa", "method": "hiprune", "budget": 32,
         "kept_tokens_per_image": 32.0, "exact_match": 0.84333},
    ]
    return pd.DataFrame(rows)


def test_markdown_is_methods_by_budgets_with_one_column_per_metric_and_blanks(tmp_path):
    table = run_table(_frame())
    text = paper_markdown(table, "Smoke")
    lines = text.splitlines()
    assert lines[0] == "# Smoke"
    header = next(line for line in lines if line.startswith("| Method"))
    assert header == ("| Method | Tokens | scene_pope · pope_accuracy (%) | scene_pope · pope_f1_score (%) "
                      "| scene_qa · exact_match (%) |")
    body = [line for line in lines if line.startswith("| ") and not line.startswith("| Method")]
    # the full model first, then budgets from the largest down; fractions as percentages with one decimal
    assert body == [
        "| **Full model** | | | | |",
        "| none | 64 | 96.8 | 96.8 | 88.8 |",
        "| **Budget 32** | | | | |",
        "| hiprune | 32 | 94.7 | 94.5 | 84.3 |",
        "| **Budget 8** | | | | |",
        "| hiprune | 8 | 84.2 | 82.2 |  |",  # no scene_qa run at 8: blank, not nan
    ]
    assert "nan" not in text and "hiprune_scene_pope 600" in text

    csv, md = write_table(table, tmp_path / "table", "Smoke")
    assert md.read_text() == text
    written = csv.read_text().splitlines()
    # the csv is the long table (one row per record and task, every metric column, four decimals), unchanged
    assert written[0] == ("model,benchmark,task,method,budget,kept_tokens_per_image,n_samples,"
                          "exact_match,pope_accuracy,pope_f1_score")
    assert written[1] == "scene_llava,scene_pope,hiprune_scene_pope,none,full,64.0000,600,,0.9683,0.9677"
