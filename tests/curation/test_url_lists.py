import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.download import ListConfig, stage_url_list
from curation.ingest import ORIGIN_LINE
from curation.records import Rejected
from curation.shards import read_table
from curation.url_lists import UrlListError, is_private_host, normalise_url, read_list, screen_url


def rows(path, required=("url", "caption")):
    return list(read_list(path, required))


def test_csv_tsv_jsonl_and_parquet_read_the_same_rows(tmp_path):
    (tmp_path / "l.csv").write_text('url,caption\nhttp://a.com/1.jpg,"a, quoted caption"\nhttp://a.com/2.jpg,plain\n')
    (tmp_path / "l.tsv").write_text("url\tcaption\nhttp://a.com/1.jpg\ta, quoted caption\nhttp://a.com/2.jpg\tplain\n")
    (tmp_path / "l.jsonl").write_text('{"url": "http://a.com/1.jpg", "caption": "a, quoted caption"}\n\n'
                                      '{"url": "http://a.com/2.jpg", "caption": "plain"}\n')
    pq.write_table(pa.table({"url": ["http://a.com/1.jpg", "http://a.com/2.jpg"],
                             "caption": ["a, quoted caption", "plain"]}), tmp_path / "l.parquet")
    for name in ("l.csv", "l.tsv", "l.jsonl", "l.parquet"):
        got = rows(tmp_path / name)
        assert [r.values for r in got] == [{"url": "http://a.com/1.jpg", "caption": "a, quoted caption"},
                                           {"url": "http://a.com/2.jpg", "caption": "plain"}], name
    assert [r.line for r in rows(tmp_path / "l.jsonl")] == [1, 3]
    assert [r.line for r in rows(tmp_path / "l.csv")] == [2, 3]


@pytest.mark.parametrize("name, text, message", [
    ("empty.csv", "", r"empty.csv: line 1: the file is empty"),
    ("header.csv", "url,caption\n", r"header.csv: line 2: no rows"),
    ("cols.csv", "link,alt\nhttp://a/1,x\n", r"cols.csv: line 1: missing column\(s\) \['url', 'caption'\]"),
    ("quote.csv", 'url,caption\nhttp://a/1,ok\nhttp://a/2,"never closed\nhttp://a/3,x\n',
     r"quote.csv: line 3: broken CSV"),  # where the record with the open quote starts, not the file's end
    ("stray.csv", 'url,caption\nhttp://a/1,ok\nhttp://a/2,"closed" then text\n', r"stray.csv: line 3: broken CSV"),
    ("fields.csv", "url,caption\nhttp://a/1,ok,extra\n", r"fields.csv: line 2: 3 fields, but 2 columns are named"),
    ("span.csv", 'url,caption\nhttp://a/1,"two\nlines",extra\n', r"span.csv: line 2: 3 fields, but 2 columns"),
    ("bad.jsonl", '{"url": "http://a/1", "caption": "x"}\n{"url": \n', r"bad.jsonl: line 2: not valid JSON"),
    ("cols.jsonl", '{"link": "http://a/1", "caption": "x"}\n', r"cols.jsonl: no record has column\(s\) \['url'\]"),
])
def test_broken_lists_name_the_file_and_line(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(UrlListError, match=message):
        rows(tmp_path / name)


def test_a_record_spanning_lines_is_named_by_the_line_it_starts_on(tmp_path):
    """As `sed -n Np` counts; blank lines count too. A keyless row's key is made from that line, so a
    record on one line keeps the key it always had, and one spanning lines is keyed by its first."""
    (tmp_path / "list.csv").write_text('url,caption\n"javascript:x","two\nlines"\nhttp://e.com/a.jpg,one\n\n\n'
                                       'http://e.com/b.jpg,"x\n\ny"\nhttp://e.com/c.jpg,z\n')
    assert [r.line for r in rows(tmp_path / "list.csv")] == [2, 4, 7, 10]
    stage_url_list(ListConfig(str(tmp_path / "list.csv")), tmp_path / "list", tmp_path / "fetch")
    staged = read_table(tmp_path / "list")
    assert staged.column("key").to_pylist() == [f"list-{n:09d}" for n in (2, 4, 7, 10)]
    assert staged.column(ORIGIN_LINE).to_pylist() == [2, 4, 7, 10]


def test_a_ten_megabyte_caption_is_a_row_not_a_crash(tmp_path):
    (tmp_path / "big.csv").write_text("url,caption\nhttp://a.com/1.jpg," + "x" * 10_000_000 + "\n")
    (row,) = rows(tmp_path / "big.csv")
    assert len(row.values["caption"]) == 10_000_000


@pytest.mark.parametrize("url, reason", [
    ("", "empty URL"), (None, "empty URL"), ("javascript:alert(1)", "scheme 'javascript'"),
    ("file:///etc/passwd", "file:// URL refused"), ("data:image/png;base64,AAAA", "scheme 'data'"),
    ("http:///nohost", "no host"), ("http://a.com:notaport/x", "unparsable"),
    ("http://127.0.0.1/x", "private-network"), ("http://localhost:8080/x", "private-network"),
    ("http://10.1.2.3/x", "private-network"), ("http://169.254.169.254/latest", "private-network"),
    ("http://[::1]/x", "private-network"), ("http://[::ffff:192.168.0.1]/x", "private-network"),
    ("http://2130706433/x", "private-network"), ("http://0x7f.1/x", "private-network"),
    ("http://0.0.0.0/x", "private-network"),
    # Spellings the resolver folds to a loopback or private address (IDNA's nameprep) or that carry one.
    ("http://\uff11\uff12\uff17\uff0e\uff10\uff0e\uff10\uff0e\uff11/x", "the resolver's '127.0.0.1'"),
    ("http://\u00b927.0.0.\u00b9/x", "private-network"),
    ("http://\uff2c\uff2f\uff23\uff21\uff2c\uff28\uff2f\uff33\uff34/x", "private-network"),  # LOCALHOST
    ("http://127\u30020\u30020\u30021/x", "private-network"), ("http://\u2460\u2461\u2466.0.0.1/x", "private-network"),
    ("http://[::127.0.0.1]/x", "private-network"), ("http://[64:ff9b::a00:1]/x", "private-network"),
    ("http://[2002:c0a8:1::]/x", "private-network"), ("http://" + "\u00fc" * 70 + ".de/x", "no IDNA form"),
])
def test_screen_refuses_bad_and_internal_urls(url, reason):
    verdict = screen_url(url)
    assert isinstance(verdict, Rejected) and reason in verdict.detail


def test_screen_opt_ins_and_public_urls():
    assert screen_url(" https://example.com/a.jpg ") == "https://example.com/a.jpg"
    assert screen_url("http://8.8.8.8/a.jpg") == "http://8.8.8.8/a.jpg"
    assert screen_url("http://127.0.0.1/a", allow_private_network=True) == "http://127.0.0.1/a"
    assert screen_url("file:///tmp/a.jpg", allow_file_urls=True) == "file:///tmp/a.jpg"
    assert not is_private_host("example.com")
    assert screen_url("http://b\u00fccher.de/a.jpg") == "http://b\u00fccher.de/a.jpg"  # a real IDN is a name
    assert screen_url("http://[64:ff9b::808:808]/a.jpg") == "http://[64:ff9b::808:808]/a.jpg"  # NAT64 of 8.8.8.8


def test_normalised_urls_match_when_they_name_the_same_resource():
    assert normalise_url("HTTP://Example.COM:80/a.jpg#top") == normalise_url("http://example.com/a.jpg")
    assert normalise_url("https://example.com") == "https://example.com/"
    # No canonical form for a malformed port or host: equal only to itself, and no crash of the whole dedup.
    assert normalise_url(" http://x:abc/1 ") == "http://x:abc/1" and normalise_url("http://[::1/3") == "http://[::1/3"
    assert normalise_url("https://example.com:8443/a?x=1") == "https://example.com:8443/a?x=1"
    assert normalise_url("http://example.com/a?x=1") != normalise_url("http://example.com/a?x=2")
    # IPv6 hosts keep their brackets: port 8080 of one host is not another host ending in :8080.
    assert normalise_url("http://[2001:DB8::1]:8080/a.jpg") == "http://[2001:db8::1]:8080/a.jpg"
    assert normalise_url("http://[2001:db8::1:8080]/a.jpg") == "http://[2001:db8::1:8080]/a.jpg"


def test_staging_shards_keys_and_only_fetches_what_passed(tmp_path):
    lines = ["url,caption,license"] + [f"http://example.com/{i}.jpg,c{i},cc" for i in range(5)]
    lines += ["javascript:x,c,cc", "http://example.com/ok.jpg,,cc"]
    (tmp_path / "list.csv").write_text("\n".join(lines) + "\n")
    config = ListConfig(str(tmp_path / "list.csv"), shard_rows=3)
    assert stage_url_list(config, tmp_path / "list", tmp_path / "fetch") == 3
    staged = read_table(tmp_path / "list")
    assert staged.column("key").to_pylist() == [f"list-{n:09d}" for n in range(2, 9)]
    assert staged.column("_reject_reason").to_pylist() == [None] * 5 + ["bad_url", "empty_caption"]
    assert staged.column("license").to_pylist() == ["cc"] * 7
    fetch = read_table(tmp_path / "fetch")
    assert fetch.column("_row").to_pylist() == [0, 1, 2, 3, 4]
    assert sorted(p.name for p in (tmp_path / "fetch").iterdir()) == ["part-00000.parquet", "part-00001.parquet"]


def test_web_tsvs_are_not_csv_quoted_and_a_headerless_list_names_its_columns(tmp_path):
    """CC3M/CC12M ship unquoted TSVs without a header: a caption that starts with a quote is text there."""
    from curation.url_lists import Layout

    (tmp_path / "cc12m.tsv").write_text('http://a.com/1.jpg\t"Best" photo of a cat\nhttp://a.com/2.jpg\ta dog\n')
    got = list(read_list(tmp_path / "cc12m.tsv", ("url", "caption"), layout=Layout(("url", "caption"))))
    assert [(r.line, r.values) for r in got] == [(1, {"url": "http://a.com/1.jpg", "caption": '"Best" photo of a cat'}),
                                                 (2, {"url": "http://a.com/2.jpg", "caption": "a dog"})]
    with pytest.raises(UrlListError, match=r"line 1: missing column.*--url_list_columns"):
        rows(tmp_path / "cc12m.tsv")  # its first row is no header
    with pytest.raises(UrlListError, match=r"--url_list_columns: missing column\(s\) \['caption'\]"):
        list(read_list(tmp_path / "cc12m.tsv", ("url", "caption"), layout=Layout(("url", "text"))))
    with pytest.raises(UrlListError, match="broken CSV"):  # a TSV that is CSV-quoted says so
        list(read_list(tmp_path / "cc12m.tsv", ("url", "caption"), layout=Layout(("url", "caption"), "csv")))


def test_a_bare_carriage_return_is_text_in_a_tsv_and_whitespace_in_jsonl(tmp_path):
    """csv's reader ended a record at a lone CR even unquoted: the caption was cut, its rest made a row
    of its own (fetched, if it held a tab and a URL), and every later line was misnumbered."""
    (tmp_path / "cr.tsv").write_bytes(b"url\tcaption\nhttp://e.com/a.jpg\ta red\rbus\r\nhttp://e.com/c.jpg\tok\n")
    got = rows(tmp_path / "cr.tsv")
    assert [(r.line, r.values) for r in got] == [(2, {"url": "http://e.com/a.jpg", "caption": "a red\rbus"}),
                                                 (3, {"url": "http://e.com/c.jpg", "caption": "ok"})]
    (tmp_path / "phantom.tsv").write_bytes(b"url\tcaption\nhttp://e.com/a.jpg\ta red bus\rhttp://e.com/b.jpg\tx\n")
    with pytest.raises(UrlListError, match="phantom.tsv: line 2: 3 fields, but 2 columns"):
        rows(tmp_path / "phantom.tsv")
    (tmp_path / "cr.jsonl").write_bytes(b'{"url": "http://e.com/a.jpg",\r "caption": "a"}\r\n'
                                        b'{"url": "http://e.com/b.jpg", "caption": "b"}\n')
    assert [(r.line, r.values["caption"]) for r in rows(tmp_path / "cr.jsonl")] == [(1, "a"), (2, "b")]


def test_parquet_lists_whose_extra_column_types_differ_stage_it_as_text(tmp_path):
    (tmp_path / "lists").mkdir()
    pq.write_table(pa.table({"url": ["http://e.com/a.jpg"], "caption": ["a"], "score": [0.5]}),
                   tmp_path / "lists" / "a.parquet")
    pq.write_table(pa.table({"url": ["http://e.com/b.jpg"], "caption": ["b"], "score": ["high"]}),
                   tmp_path / "lists" / "b.parquet")
    stage_url_list(ListConfig(str(tmp_path / "lists")), tmp_path / "list", tmp_path / "fetch")
    assert read_table(tmp_path / "list").column("score").to_pylist() == ["0.5", "high"]
    # Types Arrow unifies (int32 and int64, string and large_string) keep the extras typed.
    pq.write_table(pa.table({"url": pa.array(["http://e.com/b.jpg"], pa.large_string()), "caption": ["b"],
                             "score": pa.array([2], pa.int32())}), tmp_path / "lists" / "b.parquet")
    stage_url_list(ListConfig(str(tmp_path / "lists")), tmp_path / "typed", tmp_path / "fetch2")
    assert read_table(tmp_path / "typed").column("score").to_pylist() == [0.5, 2.0]


def test_a_byte_order_mark_is_no_header_text_and_bytes_that_are_not_utf8_are_kept_for_the_reject(tmp_path):
    (tmp_path / "excel.csv").write_bytes(b"\xef\xbb\xbfurl,caption\nhttp://a.com/1.jpg,caf\xe9\n")
    (row,) = rows(tmp_path / "excel.csv")
    assert list(row.values) == ["url", "caption"]
    assert row.values["caption"] == "caf\udce9"  # not a silent U+FFFD: staging rejects it as non_utf8_caption


def test_staging_keeps_every_rows_columns_and_rejects_what_is_not_a_caption(tmp_path):
    lines = [{"url": " http://example.com/0.jpg ", "caption": "a cat", "key": 0},
             {"url": "http://example.com/1.jpg", "caption": "a dog", "licence": "cc-by"},  # a column row 0 lacks
             {"url": "http://example.com/2.jpg", "caption": 5},
             {"url": "http://example.com/3.jpg", "caption": ["a", "b"]}]
    path = tmp_path / "list.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with path.open("ab") as f:
        f.write(b'{"url": "http://example.com/4.jpg", "caption": "caf\xe9"}\n')
    stage_url_list(ListConfig(str(path)), tmp_path / "list", tmp_path / "fetch")
    staged = read_table(tmp_path / "list").to_pylist()
    assert [r["key"] for r in staged][:2] == ["0", "list-000000002"]  # key 0 is a key
    assert staged[0]["url"] == "http://example.com/0.jpg"  # screened: no space goes to img2dataset
    assert [r["licence"] for r in staged] == [None, "cc-by", None, None, None]
    assert [r["_reject_reason"] for r in staged] == [None, None, "missing_field", "missing_field", "non_utf8_caption"]
    assert staged[2]["_reject_detail"] == "caption is int, not text"
    assert read_table(tmp_path / "fetch").column("_row").to_pylist() == [0, 1]


def test_a_list_column_named_like_a_staged_one_is_refused(tmp_path):
    """With --caption_column TEXT, a `caption` column of the list would have overwritten the screened text."""
    (tmp_path / "list.csv").write_text("URL,TEXT,caption,status\nhttp://example.com/0.jpg,a cat,old,ok\n")
    config = ListConfig(str(tmp_path / "list.csv"), url_column="URL", caption_column="TEXT")
    with pytest.raises(UrlListError, match=r"line 2: column\(s\) \['caption', 'status'\] would be overwritten"):
        stage_url_list(config, tmp_path / "list", tmp_path / "fetch")


def test_a_repeated_header_name_and_a_line_of_spaces(tmp_path):
    """url,caption,caption kept the last caption and lost the first; one stray space stopped the build."""
    (tmp_path / "dup.csv").write_text("url,caption,caption\nhttp://a/1,first,second\n")
    with pytest.raises(UrlListError, match=r"dup.csv: line 1: column name\(s\) \['caption'\] repeated"):
        rows(tmp_path / "dup.csv")
    (tmp_path / "spaces.tsv").write_text("url\tcaption\nhttp://a/1\tone\n  \nhttp://a/2\ttwo\n \n")
    assert [(r.line, r.values["caption"]) for r in rows(tmp_path / "spaces.tsv")] == [(2, "one"), (4, "two")]


def test_a_jsonl_record_without_a_field_is_a_row_and_a_list_without_it_is_refused(tmp_path):
    """The first record alone decided: without a caption it refused the whole list, while the same gap on a
    later record was one row's reject."""
    (tmp_path / "l.jsonl").write_text('{"url": "http://a/1"}\n{"url": "http://a/2", "caption": "x"}\n')
    assert [r.values.get("caption") for r in rows(tmp_path / "l.jsonl")] == [None, "x"]
    (tmp_path / "none.jsonl").write_text('{"url": "http://a/1"}\n{"url": "http://a/2"}\n')
    with pytest.raises(UrlListError, match=r"none.jsonl: no record has column\(s\) \['caption'\]"):
        rows(tmp_path / "none.jsonl")


def test_every_file_of_a_list_directory_is_read_or_the_run_is_refused(tmp_path):
    """A .csv.gz beside the .csv, or a .tsv under --url_list_format csv, was skipped without a word; a
    directory of .txt lists with the format given was refused as holding none; a.csv and a.tsv made the
    same keys."""
    from curation.url_lists import list_files

    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "a.csv").write_text("url,caption\nhttp://a/1,x\n")
    (lists / "_SUCCESS").write_text("")
    assert [p.name for p in list_files(lists)] == ["a.csv"]
    (lists / "b.csv.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(UrlListError, match=r"b.csv.gz: the extension names no URL list format"):
        list_files(lists)
    (lists / "b.csv.gz").unlink()
    (lists / "c.txt").write_text("url,caption\nhttp://a/2,y\n")
    assert [p.name for p in list_files(lists, "csv")] == ["a.csv", "c.txt"]
    (lists / "d.tsv").write_text("url\tcaption\n")
    with pytest.raises(UrlListError, match=r"d.tsv: not csv by its extension"):
        list_files(lists, "csv")
    (lists / "c.txt").unlink()
    (lists / "a.tsv").write_text("url\tcaption\nhttp://a/3\tz\n")
    (lists / "d.tsv").unlink()
    with pytest.raises(UrlListError, match=r"a.csv and a.tsv share the stem 'a'"):
        list_files(lists)
