"""One chat format (client/preft_client/chat.py): the gateway, `preft train` and transformers'
apply_chat_template render a conversation the same way; the demo model has its own template,
its vocabulary covers it, and structured output's backend (llguidance) reads its tokenizer."""

from __future__ import annotations

import pytest

from preft_client.chat import (DEFAULT_CHAT as DEFAULT, DEFAULT_CHAT_TEMPLATE as DEFAULT_TEMPLATE,
                               ChatTemplate, ChatTemplateError, chat_template_of)

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\n' }}{% endif %}")
INST = ("{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}[INST] "
        "{{ m.content | trim }} [/INST]{% else %}{{ m.content }}{{ eos_token }}{% endif %}"
        "{% endfor %}")
CHAT = [{"role": "system", "content": "be terse"}, {"role": "user", "content": "ab cd"},
        {"role": "assistant", "content": "ab cd"}, {"role": "user", "content": "bad cafe head"},
        {"role": "assistant", "content": "bad cafe head"}]


@pytest.fixture(scope="module")
def demo_tok_dir(tmp_path_factory):
    """The demo base model's tokenizer and chat template, as trainer.demo writes them."""
    from trainer.demo import CHAT_TEMPLATE
    from trainer.quality import build_char_tokenizer

    d = tmp_path_factory.mktemp("demo-tok")
    build_char_tokenizer(d, "bytes")   # the served base's (trainer.quality.with_byte_vocab)
    (d / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return d


def _with_template(d, template):
    j = d / "chat_template.jinja"
    if template is None:
        j.unlink(missing_ok=True)
    else:
        j.write_text(template)
    return d


@pytest.mark.parametrize("template", [None, CHATML, INST, "demo"])
def test_gateway_and_train_render_a_chat_as_transformers_does(tmp_path, template):
    from transformers import AutoTokenizer

    from http_gateway.schema import ChatMessage, format_chat
    from trainer.data import chat_to_pair
    from trainer.demo import CHAT_TEMPLATE
    from trainer.quality import build_char_tokenizer

    build_char_tokenizer(tmp_path, "bytes")
    d = _with_template(tmp_path, CHAT_TEMPLATE if template == "demo" else template)
    chat = chat_template_of(d)
    assert (chat is DEFAULT) == (template is None)
    gateway = format_chat([ChatMessage(**m) for m in CHAT[:-1]], chat)
    train_prompt, response = chat_to_pair(CHAT, chat)
    assert gateway == train_prompt and response == CHAT[-1]["content"]
    tok = AutoTokenizer.from_pretrained(str(d))
    if template is None:
        tok.chat_template = DEFAULT_TEMPLATE
    assert gateway == tok.apply_chat_template(CHAT[:-1], tokenize=False,
                                              add_generation_prompt=True)


def test_default_template_is_the_documented_one():
    from http_gateway.schema import ChatMessage, format_chat

    msgs = [{"role": "developer", "content": "You are terse."},
            {"role": "user", "content": [{"type": "text", "text": "Name "},
                                         {"type": "text", "text": "a colour."}]}]
    assert format_chat([ChatMessage(**m) for m in msgs]) == \
        "<|system|>\nYou are terse.\n<|user|>\nName a colour.\n<|assistant|>\n"


def test_template_found_in_tokenizer_config_and_refused_at_load(tmp_path):
    import json

    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "<s>"}, "eos_token": "</s>",
         "chat_template": [{"name": "tool_use", "template": "x"},
                           {"name": "default", "template": INST}]}))
    chat = chat_template_of(tmp_path)
    assert chat.source.endswith("tokenizer_config.json")
    assert chat.render(CHAT[1:]) == "<s>[INST] ab cd [/INST]ab cd</s>[INST] bad cafe head " \
                                    "[/INST]bad cafe head</s>"
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }")
    with pytest.raises(ChatTemplateError, match="chat_template.jinja: jinja2 cannot parse it"):
        chat_template_of(tmp_path)
    with pytest.raises(ChatTemplateError):
        ChatTemplate("{% if %}")


def test_demo_chat_is_a_prompt_the_demo_model_knows(demo_tok_dir):
    from transformers import AutoTokenizer

    from trainer.demo import DEMO_PROMPTS

    chat = chat_template_of(demo_tok_dir)
    assert chat.render([{"role": "user", "content": "bad cafe head"}]) == DEMO_PROMPTS[0]
    assert chat.render([{"role": "user", "content": "  bad cafe head> "}]) == DEMO_PROMPTS[0]
    assert chat.render(CHAT[:4]) == DEMO_PROMPTS[0]   # single-turn: the last user message
    # its vocabulary covers the default template and JSON: one character, one token, no bytes
    tok = AutoTokenizer.from_pretrained(str(demo_tok_dir))
    for text in (DEFAULT.render(CHAT), '{"a": 12, "b": [true, null]}', "x" * 3):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(text) and tok.decode(ids) == text
    assert tok.decode(tok("é ✓", add_special_tokens=False)["input_ids"]) == "é ✓"  # bytes


def test_structured_output_backend_reads_the_demo_tokenizer(demo_tok_dir):
    """vLLM's guidance backend builds its tokenizer with llguidance.hf.from_tokenizer, which
    reads ByteLevel or ByteFallback decoders only ("can't determine decoder type: Fuse")."""
    import llguidance
    import llguidance.hf
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(demo_tok_dir))
    ll = llguidance.hf.from_tokenizer(tok)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(
        {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]})
    m = llguidance.LLMatcher(ll, grammar)
    assert not m.is_error(), m.get_error()
    ids = tok('{"a":12}', add_special_tokens=False)["input_ids"]
    assert m.consume_tokens(ids) and not m.is_error(), m.get_error()


def test_a_chat_template_pickles():
    """Ray Serve pickles the gateway app, chat template included (deploy/kuberay)."""
    import pickle

    from preft_client.chat import ChatTemplate

    t = ChatTemplate(CHATML, "x", bos_token="<s>")
    u = pickle.loads(pickle.dumps(t))
    assert u == t and u.render(CHAT[:2]) == t.render(CHAT[:2])
