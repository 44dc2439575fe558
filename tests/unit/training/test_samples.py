"""Sample tables by default only on the built-in task's data."""

from kilter.training.samples import SampleSection, default_sample_count


def test_samples_default_to_the_built_in_task_only():
    assert default_sample_count(None, "builtin:sft") == 4
    assert default_sample_count(None, "data/my_demos.jsonl") == 0
    assert default_sample_count(None, None) == 0
    assert default_sample_count(None, "data/my_demos.jsonl", asked=True) == 4
    assert default_sample_count(2, "data/my_demos.jsonl") == 2  # set: as asked
    assert default_sample_count(0, "builtin:sft") == 0


def test_sample_section_counts_prompts_given_as_asking():
    assert SampleSection().count("data/pairs.jsonl") == 0
    assert SampleSection().count("builtin:sft") == 4
    assert SampleSection(prompts="builtin:prompts_eval").count("data/pairs.jsonl") == 4
    assert SampleSection(n=3).count("data/pairs.jsonl") == 3
