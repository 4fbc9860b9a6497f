"""Editing docs/results.md sections: a benchmark replaces its own section and nothing else."""
from heloco_p2p.report import replace_section

MD = "# R\n\n## A\n\nx\n\n### S\n\nold\n\n### T\n\nt\n\n## B\n\nb\n"


def test_subsection_replaced_and_neighbours_kept():
    out = replace_section(MD, "### S", "new")
    assert out == "# R\n\n## A\n\nx\n\n### S\n\nnew\n\n### T\n\nt\n\n## B\n\nb\n"


def test_section_replaces_its_subsections_up_to_the_next_section():
    assert replace_section(MD, "## A", "a") == "# R\n\n## A\n\na\n\n## B\n\nb\n"


def test_missing_section_is_appended():
    assert replace_section(MD, "## C", "c").endswith("## B\n\nb\n\n## C\n\nc\n")
