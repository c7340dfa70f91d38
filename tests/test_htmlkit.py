from mimic_toolkit.htmlkit import Html, image, page, table


def test_text_is_escaped_and_markup_is_not():
    cells = table(["model", "note"], [["<b>", Html("<i>ok</i>")], ["failed", "out of memory"]])
    assert "<td>&lt;b&gt;</td><td><i>ok</i></td>" in cells
    assert page("a < b", cells).count("<style>") == 1 and "<title>a &lt; b</title>" in page("a < b")


def test_a_short_row_spans_the_rest_and_images_are_embedded():
    assert "<td colspan=3>no result</td>" in table(["a", "b", "c", "d"], [["x", "no result"]])
    assert image(b"\x89PNG").startswith("<img src='data:image/png;base64,iVBORw==")
