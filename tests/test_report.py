"""Editing docs/results.md sections: a benchmark replaces its own section and nothing else."""
from heloco_p2p.tools.report import replace_section

MD = "# R\n\n## A\n\nx\n\n### S\n\nold\n\n### T\n\nt\n\n## B\n\nb\n"


def test_subsection_replaced_and_neighbours_kept():
    out = replace_section(MD, "### S", "new")
    assert out == "# R\n\n## A\n\nx\n\n### S\n\nnew\n\n### T\n\nt\n\n## B\n\nb\n"


def test_section_replaces_its_subsections_up_to_the_next_section():
    assert replace_section(MD, "## A", "a") == "# R\n\n## A\n\na\n\n## B\n\nb\n"


def test_missing_section_is_appended():
    assert replace_section(MD, "## C", "c").endswith("## B\n\nb\n\n## C\n\nc\n")


def _lang_results():
    def run(algo, seed, de, en, budget="time"):
        return {"algorithm": algo, "heterogeneity": "severe", "data": "non-iid", "seed": seed, "budget": budget,
                "tokens": 1, "virtual_seconds": 1.0, "val_loss": {"mean": (de + en) / 2, "per_language": {"de": de, "en": en}}}
    return {"runs": [run("heloco", 0, 4.0, 10.0), run("heloco", 1, 4.0, 12.0),
                     run("fair", 0, 5.0, 7.0), run("fair", 1, 6.0, 7.0)]}


def test_language_table_gives_seed_means_and_the_worst_language():
    from heloco_p2p.tools.report import language_table

    md = language_table(_lang_results())
    assert "| heloco | 4.000 | 11.000 | 7.500 | 11.000 (en) |" in md
    assert "| fair | 5.500 | 7.000 | 6.250 | 7.000 (en) |" in md


def test_paired_table_differences_on_the_same_seed():
    from heloco_p2p.tools.report import paired_table

    md = paired_table(_lang_results(), "heloco")
    # seed 0: 6.0 − 7.0 = −1.0 ; seed 1: 6.5 − 8.0 = −1.5 → mean −1.25 ± 0.25
    assert "| non-iid | time | severe | fair | -1.250 ± 0.250 | 2 |" in md
