"""`ziya-batch bench --markdown`: rewrites only its own subsection of docs/BENCHMARKS.md's engine section."""
from ziya_batch.tools.bench import GENERATED, SECTION, write_markdown

META = dict(card="GPU-X", date="2026-01-01", commit="abc1234", layers=40, requests=1024, bandwidth_tb_s=3.0)


def rows(tok_s):
    return [dict(method="engine", output_tok_s=tok_s, prefill_tok_s=2.0, decode_tok_s=3.0, peak_gib=4.0,
                 requests=1024, note="n")]


def test_markdown_keeps_hand_written_subsections_and_replaces_its_own(tmp_path):
    path = tmp_path / "B.md"
    path.write_text(f"# Benchmarks\n\n## Queue\n\nq\n\n{SECTION}\n\nIntro.\n\n### Notes by hand\n\nkeep me\n\n"
                    "## Later section\n\nlater\n")
    write_markdown(str(path), rows(1111.0), META, None)
    text = path.read_text()
    assert text.index("Intro.") < text.index(GENERATED) < text.index("### Notes by hand")
    assert "| engine | 1,111 |" in text and "keep me" in text and "later" in text and "\nq\n" in text
    write_markdown(str(path), rows(2222.0), META, None)
    again = path.read_text()
    assert again.count(GENERATED) == 1 and "1,111" not in again and "| engine | 2,222 |" in again
    assert again.replace("2,222", "1,111") == text


def test_markdown_adds_the_section_to_a_file_without_it(tmp_path):
    path = tmp_path / "B.md"
    path.write_text("# Benchmarks\n\n## Queue\n\nq\n")
    write_markdown(str(path), rows(5.0), META, None)
    text = path.read_text()
    assert text.index("## Queue") < text.index(SECTION) < text.index(GENERATED)
    fresh = tmp_path / "new.md"
    write_markdown(str(fresh), rows(5.0), META, None)
    assert fresh.read_text().startswith("# Benchmarks\n\n" + SECTION + "\n\n" + GENERATED)


def test_the_run_states_each_engine_row_against_the_continuous_batching_baseline_of_the_same_run():
    from ziya_batch.tools.bench import render_markdown
    from ziya_batch.tools.bench_core import ratios_text
    base = dict(method="hf-continuous", output_tok_s=400.0, finished_tok_s=250.0, prefill_tok_s=None,
                decode_tok_s=None, peak_gib=None, requests=256, note="b")
    fp8 = dict(rows(8000.0)[0], config="KV cache fp8, weights fp8")
    text = ratios_text(rows(4000.0) + [fp8, base])
    assert "400 tok/s, every streamed token; 250 tok/s counting finished requests alone" in text
    assert "engine 10.0x (16.0x); engine (KV cache fp8, weights fp8) 20.0x (32.0x)." in text
    assert text in render_markdown(rows(4000.0) + [fp8, base], META, None)
    # without streaming there is one count; without the baseline (or if it failed) no line at all
    assert "(16.0x)" not in ratios_text(rows(4000.0) + [dict(base, finished_tok_s=None)])
    assert ratios_text(rows(4000.0)) == "" == ratios_text(rows(4000.0) + [dict(base, output_tok_s=None)])
    assert ratios_text([base]) == ""


def test_a_failed_rows_error_text_stays_in_its_table_cell():
    from ziya_batch.tools.bench import render_markdown
    failed = dict(method="engine", output_tok_s=None, prefill_tok_s=None, decode_tok_s=None, peak_gib=None,
                  requests=0, note="--also x=1 failed: RuntimeError: a | b\n| engine | 9,999 |")
    lines = render_markdown(rows(5.0) + [failed], META, None).splitlines()
    row = [x for x in lines if "failed" in x]
    assert len(row) == 1 and row[0].endswith("RuntimeError: a \\| b \\| engine \\| 9,999 \\| |")
    assert not any(x.startswith("| engine | 9,999") for x in lines)
