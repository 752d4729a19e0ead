"""Bad input gets one clear error that names the value and the fix."""

import pytest

from interplab import load_model
from interplab.engine import SiteError, TokenizationError
from interplab.engine.tokens import check_equal_lengths, single_token
from interplab.models.loading import ModelLoadError


def test_unknown_site_lists_valid_kinds(tiny_models):
    with pytest.raises(SiteError, match="unknown site kind 'resid'.*valid kinds: embed, resid_pre, resid_mid"):
        tiny_models("llama").run("Mary lives in", capture=["resid.0"])


def test_layer_and_head_out_of_range(tiny_models):
    model = tiny_models("gpt2")
    with pytest.raises(SiteError, match=r"layer 3 out of range.*0\.\.2"):
        model.run("Mary", capture=["mlp_out.3"])
    with pytest.raises(SiteError, match=r"head 4 out of range.*0\.\.3"):
        model.run("Mary", capture=["pattern.0.4"])


def test_site_the_family_lacks(tiny_models):
    with pytest.raises(SiteError, match="gpt_neox family .* has no resid_mid"):
        tiny_models("gpt_neox").run("Mary", capture=["resid_mid.1"])


def test_unequal_lengths_show_both_tokenizations(tiny_models):
    tok = tiny_models("llama").tokenizer
    with pytest.raises(TokenizationError) as info:
        check_equal_lengths(tok, ["Mary lives in Paris", "John went"], ["Mary lives in Paris", "John went to the store"])
    message = str(info.value)
    assert "prompt 1" in message and "prompt 0" not in message
    assert "2 tokens ['John', ' went']" in message and "5 tokens" in message and "fix:" in message


def test_multi_token_answer_is_named(tiny_models):
    tok = tiny_models("llama").tokenizer
    assert single_token(tok, " Mary") == tok(" Mary", add_special_tokens=False)["input_ids"][0]
    with pytest.raises(TokenizationError, match=r"answer ' Mary Mary' must be a single token but is 2 tokens"):
        single_token(tok, " Mary Mary")


def test_unknown_model_names(tmp_path):
    with pytest.raises(ModelLoadError, match="unknown tiny model 'tiny-bert'.*tiny-gpt2"):
        load_model("tiny-bert")
    with pytest.raises(ModelLoadError, match="unknown model 'no-such-org/no-such-model'.*smollm2-135m"):
        load_model("no-such-org/no-such-model")
    with pytest.raises(ModelLoadError, match="GGUF file not found: .*missing.gguf"):
        load_model(str(tmp_path / "missing.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="has no config.json"):
        load_model(str(tmp_path / "empty"))
    with pytest.raises(ModelLoadError, match="unknown dtype 'float8'.*float32, float16, bfloat16"):
        load_model("tiny-llama", dtype="float8")


def test_unsupported_family_is_named():
    from interplab.models.arch import arch_for_model_type

    with pytest.raises(ValueError, match="model type 'bert' is not supported.*gpt2.*llama.*Add a family file"):
        arch_for_model_type("bert")
