#!/usr/bin/env python3
"""Generate chat-template and SFT-tokenisation fixtures for worker/tests/chat_templates.rs.

Usage (from the repository root):

    python scripts/make_chat_fixtures.py        # writes worker/tests/fixtures/chat/

Needs: transformers (with jinja2) and tokenizers; no torch. Deterministic.

Writes:
- tok_llama/, tok_qwen/: two small byte-level BPE tokenizers saved by
  transformers' PreTrainedTokenizerFast (tok_llama: <s> BOS added by the
  post-processor, eos </s>, unk <unk>, no pad; tok_qwen: no BOS, eos
  <|im_end|>, pad <|endoftext|>, Qwen2.5's chat template).
- jinja.json: real-world chat templates x conversations x add_generation_prompt,
  with transformers' apply_chat_template(tokenize=False) output or the error
  message it raised.
- named.json: each MedicalGPT named template's one-turn and two-turn prompt,
  computed from the template table below with Python's str.format, as
  MedicalGPT's Conversation._format_example does.
- sft.json: input_ids/labels of an independent re-implementation of
  MedicalGPT's SFT preprocess_function (HEAD) with the HF tokenizer.

If MEDICALGPT_TEMPLATE_PY points at MedicalGPT's training/template.py, the
table below is first checked against it (every template's get_prompt).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

REPO_ROOT = Path(__file__).resolve().parent.parent
OUT = REPO_ROOT / "worker" / "tests" / "fixtures" / "chat"
DATA = REPO_ROOT.parent / "shared" / "data" / "medicalgpt"
if not DATA.exists():
    DATA = Path("/work/shared/data/medicalgpt")

# --------------------------------------------------------------------------------------
# Real-world chat templates (as published in the models' tokenizer_config.json).

QWEN25 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

QWEN2 = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"

LLAMA3 = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"

LLAMA2 = "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"

MISTRAL = "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"

GEMMA = "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"

ZEPHYR = """{% for message in messages %}
{% if message['role'] == 'user' %}
{{ '<|user|>\\n' + message['content'] + eos_token }}
{% elif message['role'] == 'system' %}
{{ '<|system|>\\n' + message['content'] + eos_token }}
{% elif message['role'] == 'assistant' %}
{{ '<|assistant|>\\n'  + message['content'] + eos_token }}
{% endif %}
{% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
{% endif %}
{% endfor %}"""

# Qwen3 (tool branches shortened): reverse slicing, `is string`, set inside if/for, split/rstrip/lstrip.
QWEN3 = """{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""

# Python string methods, namespace(), filtered loops, loop controls, block whitespace control.
PYMETHODS = """{%- set ns = namespace(system='', found=false, turns=0) -%}
{%- for message in messages -%}
    {%- if message['role'] == 'system' -%}
        {%- set ns.system = message['content'].strip() -%}
        {%- set ns.found = true -%}
    {%- endif -%}
{%- endfor -%}
{{ bos_token }}
{%- if ns.found %}<<SYS>>{{ ns.system.upper() }}<</SYS>>
{% endif %}
{% for message in messages if message['role'] != 'system' %}
    {% if message['content'].startswith('SKIP') %}{% continue %}{% endif %}
    {% set ns.turns = ns.turns + 1 %}
    {% if message['role'] == 'user' %}
[INST] {{ message['content'].strip().replace('\\n', ' ') }} [/INST]
    {% else %}
 {{ message['content'].lstrip() }}{{ eos_token }} ({{ message['content'].split()|length }} words)
    {% endif %}
    {% if message['content'].endswith('STOP') %}{% break %}{% endif %}
{% endfor %}
{% if add_generation_prompt %}turns={{ ns.turns }} {{ unk_token }}|{{ pad_token is defined }}{% endif %}"""

TOJSON = """{{ messages | tojson }}
{{ messages[0] | tojson(indent=2) }}
{{ {'b': 1.5, 'a': [1, 2.0, none, true], 'z': '\\u00e9"<&>'} | tojson(sort_keys=true) }}
{{ tools is none }}|{{ add_generation_prompt | tojson }}"""

# --------------------------------------------------------------------------------------
# MedicalGPT named templates: (name, system_prompt, prompt, sep, stop_str), from the
# reference notes' table (training/template.py at HEAD).

VICUNA_SYS = ("A chat between a curious user and an artificial intelligence assistant. "
              "The assistant gives helpful, detailed, and polite answers to the user's questions.")
HUMAN_SYS = ("A chat between a curious human and an artificial intelligence assistant. "
             "The assistant gives helpful, detailed, and polite answers to the human's questions.")
LLAMA2_SYS = ("<<SYS>>\nYou are a helpful, respectful and honest assistant. Always answer as helpfully as possible, "
              "while being safe. Your answers should not include any harmful, unethical, racist, sexist, toxic, "
              "dangerous, or illegal content. Please ensure that your responses are socially unbiased and positive "
              "in nature.\n\nIf a question does not make any sense, or is not factually coherent, explain why instead "
              "of answering something not correct. If you don't know the answer to a question, please don't share "
              "false information.\n<</SYS>>\n\n")
CHATML_PROMPT = "<|im_start|>user\n{query}<|im_end|>\n<|im_start|>assistant\n"
QWEN_SYS = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
NAMED = [
    ("vicuna", VICUNA_SYS, "USER: {query} ASSISTANT:", "</s>", "</s>"),
    ("base", "", "{query}", "</s>", "</s>"),
    ("alpaca", "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
     "### Instruction:\n{query}\n\n### Response:\n", "\n\n", "</s>"),
    ("baichuan", "", "<reserved_102>{query}<reserved_103>", "</s>", "</s>"),
    ("baichuan2", "", "<reserved_106>{query}<reserved_107>", "</s>", "</s>"),
    ("ziya", "", "<human>:{query}\n<bot>:", "\n", "</s>"),
    ("linly", "", "User: {query}\nBot: ", "\n", "</s>"),
    ("chatglm", "", "问：{query}\n答：", "\n", "</s>"),
    ("chatglm2", "", "问：{query}\n\n答：", "\n\n", "</s>"),
    ("chatglm3", "", "<|user|>\n{query}<|assistant|>", "\n", "<|user|>"),
    ("phoenix", HUMAN_SYS + "\n\n", "Human: <s>{query}</s>Assistant: ", "</s>", "</s>"),
    ("belle", "", "Human: {query}\n\nBelle: ", "\n\n", "</s>"),
    ("aquila", HUMAN_SYS, "Human: {query}###Assistant:", "###", "</s>"),
    ("intern", "", "<|User|>:{query}<eoh>\n<|Bot|>:", "<eoa>\n", "<eoa>"),
    ("intern2", "<|im_start|>system\nYou are an AI assistant whose name is InternLM (书生·浦语).\n<|im_end|>\n",
     CHATML_PROMPT, "<|im_end|>\n", "<|im_end|>"),
    ("starchat", "<system>\n", "<|user|>\n{query}<|end|>\n<|assistant|>\n", "<|end|>\n", "<|end|>"),
    ("llama2", LLAMA2_SYS, "[INST] {query} [/INST]", "</s>", "</s>"),
    ("llama3", "<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful, excellent and smart assistant.",
     "<|start_header_id|>user<|end_header_id|>\n\n{query}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
     "<|eot_id|>", "<|eot_id|>"),
    ("llama2-zh", "[INST] <<SYS>>\nYou are a helpful assistant. 你是一个乐于助人的助手。\n<</SYS>>\n\n [/INST]",
     "[INST] {query} [/INST]", "</s>", "</s>"),
    ("mistral", "", "[INST] {query} [/INST]", "</s>", "</s>"),
    ("xverse", "", "Human: {query}\n\nAssistant: ", "</s>", "</s>"),
    ("chatml", "You are a helpful assistant.", CHATML_PROMPT, "<|im_end|>\n", "<|im_end|>"),
    ("deepseek", "", "User: {query}\n\nAssistant:", "</s>", "</s>"),
    ("deepseek3", "", "<｜User｜>{query}<｜Assistant｜>", "</s>", "</s>"),
    ("deepseekcoder",
     "You are an AI programming assistant, utilizing the Deepseek Coder model, developed by Deepseek Company, "
     "and you only answer questions related to computer science. For politically sensitive questions, security "
     "and privacy issues, and other non-computer science questions, you will refuse to answer\n",
     "### Instruction:\n{{content}}\n### Response:\n", "\n", "<|EOT|>"),
    ("yi", "", CHATML_PROMPT, "\n", "<|im_end|>"),
    ("orion", "", "Human: {query}\n\nAssistant: </s>", "</s>", "</s>"),
    ("cohere", "<BOS_TOKEN>",
     "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>{query}<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>",
     "</s>", "</s>"),
    ("qwen", QWEN_SYS, CHATML_PROMPT, "\n", "<|im_end|>"),
    ("qwen3", QWEN_SYS, CHATML_PROMPT, "\n", "<|im_end|>"),
    ("qwen3_nothink", QWEN_SYS, CHATML_PROMPT, "\n", "<|im_end|>"),
    ("qwen3_5", QWEN_SYS, CHATML_PROMPT, "\n", "<|im_end|>"),
    ("qwen3_5_nothink", QWEN_SYS, CHATML_PROMPT, "\n", "<|im_end|>"),
]
NAMED_BY_NAME = {t[0]: t for t in NAMED}


def format_example(name, pairs, system_prompt=""):
    """Conversation._format_example of MedicalGPT (re-implemented)."""
    _, tsys, prompt, sep, _ = NAMED_BY_NAME[name]
    system = system_prompt or tsys
    system = system + sep if system else ""
    out = []
    for i, (q, a) in enumerate(pairs):
        out.append((system if i == 0 else sep) + prompt.format(query=q))
        out.append(a)
    return out


def check_against_medicalgpt():
    path = os.environ.get("MEDICALGPT_TEMPLATE_PY")
    if not path:
        return
    ns: dict = {}
    exec(compile(Path(path).read_text(), path, "exec"), ns)
    registered = ns["conv_templates"]
    assert sorted(registered) == sorted(NAMED_BY_NAME), (sorted(registered), sorted(NAMED_BY_NAME))
    for name, conv in registered.items():
        for pairs, system in [([["Q1", "A1"], ["Q2", ""]], ""), ([["Q", ""]], "SYS")]:
            want = conv.get_prompt(pairs, system_prompt=system)
            got = "".join(format_example(name, pairs, system))
            assert want == got, (name, want, got)
        assert conv.stop_str == NAMED_BY_NAME[name][4], name
    print(f"named template table checked against {path}")


# --------------------------------------------------------------------------------------
# Tokenizers.


def corpus():
    lines = []
    for f in ["sft/medical_sft_1K_format.jsonl", "sft/sharegpt_zh_1K_format.jsonl"]:
        with open(DATA / f, encoding="utf-8") as fh:
            for i, line in enumerate(fh):
                if i >= 120:
                    break
                for t in json.loads(line)["conversations"]:
                    lines.append(t["value"][:400])
    lines += ["Hello, who are you? I am a doctor. What is a fever? A raised body temperature."] * 20
    return lines


def train_tokenizer(specials, vocab_size=700):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    return tok


def make_tokenizers():
    llama = train_tokenizer(["<unk>", "<s>", "</s>"])
    llama.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", llama.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=llama, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.chat_template = LLAMA2
    d = OUT / "tok_llama"
    fast.save_pretrained(d)

    qwen = train_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    qwen.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=qwen, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = QWEN25
    fast.save_pretrained(OUT / "tok_qwen")


def load(name):
    return transformers.AutoTokenizer.from_pretrained(OUT / name)


# --------------------------------------------------------------------------------------
# Jinja rendering.

CONVERSATIONS = {
    "one_turn": [
        {"role": "user", "content": "Hello, who are you?"},
        {"role": "assistant", "content": "I am a doctor."},
    ],
    "system_multi": [
        {"role": "system", "content": "  You are a careful medical assistant. "},
        {"role": "user", "content": "What is a fever?\nPlease explain."},
        {"role": "assistant", "content": " A raised body temperature, \"often\" above 38°C. "},
        {"role": "user", "content": "高血的辅助检查有些什么？"},
    ],
    "multi_ending_assistant": [
        {"role": "user", "content": "q1 with  spaces "},
        {"role": "assistant", "content": "a1 STOP"},
        {"role": "user", "content": "SKIP this one"},
        {"role": "assistant", "content": "体检"},
    ],
    "user_only": [{"role": "user", "content": "Just a question"}],
    "thinking": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
        {"role": "user", "content": "and 3+3?"},
        {"role": "assistant", "content": "<think>\nagain\n</think>\n\n6"},
    ],
}

TEMPLATES = {
    "qwen2": (QWEN2, "tok_qwen"),
    "qwen2_5": (QWEN25, "tok_qwen"),
    "qwen3": (QWEN3, "tok_qwen"),
    "llama3": (LLAMA3, "tok_llama"),
    "llama2": (LLAMA2, "tok_llama"),
    "mistral": (MISTRAL, "tok_llama"),
    "gemma": (GEMMA, "tok_llama"),
    "zephyr": (ZEPHYR, "tok_llama"),
    "pymethods": (PYMETHODS, "tok_llama"),
    "tojson": (TOJSON, "tok_qwen"),
}


def jinja_cases():
    cases = []
    for tname, (template, tokname) in TEMPLATES.items():
        tok = load(tokname)
        for cname, conv in CONVERSATIONS.items():
            for agp in (False, True):
                case = {
                    "template": tname,
                    "tokenizer": tokname,
                    "conversation": cname,
                    "add_generation_prompt": agp,
                }
                try:
                    case["expected"] = tok.apply_chat_template(
                        conv, chat_template=template, tokenize=False, add_generation_prompt=agp
                    )
                except Exception as e:  # noqa: BLE001 - the message is the fixture
                    case["error"] = str(e)
                cases.append(case)
    return {"templates": {k: v[0] for k, v in TEMPLATES.items()}, "conversations": CONVERSATIONS, "cases": cases}


# --------------------------------------------------------------------------------------
# MedicalGPT SFT preprocess (HEAD), re-implemented with the HF tokenizer.


def fix_tokenizer(tok, template_name):
    if tok.eos_token_id is None:
        tok.eos_token = NAMED_BY_NAME[template_name][4] if template_name else "</s>"
        tok.add_special_tokens({"eos_token": tok.eos_token})
    if tok.bos_token_id is None:
        tok.add_special_tokens({"bos_token": tok.eos_token})
        tok.bos_token_id = tok.eos_token_id
    if tok.pad_token_id is None:
        tok.pad_token = tok.unk_token if tok.unk_token_id is not None else tok.eos_token
    return tok


def dialog_of(tok, template_name, messages):
    system = messages[0]["content"] if messages[0]["role"] == "system" else ""
    body = messages[1:] if system else messages
    pairs = [[body[i]["content"], body[i + 1]["content"]] for i in range(0, len(body), 2)]
    if template_name:
        return format_example(template_name, pairs, system)
    convs, acc, prev = [], [], ""
    if system:
        acc.append({"role": "system", "content": system})
    for q, a in pairs:
        acc.append({"role": "user", "content": q})
        cur = tok.apply_chat_template(acc, tokenize=False, add_generation_prompt=True)
        convs.append(cur[len(prev):])
        convs.append(a)
        acc.append({"role": "assistant", "content": a})
        prev = tok.apply_chat_template(acc, tokenize=False, add_generation_prompt=False)
    return convs


def preprocess(tok, dialog, max_length, train_on_inputs, ignore_index):
    input_ids, labels = [], []
    for i in range(len(dialog) // 2):
        src = tok.encode(text=dialog[2 * i], add_special_tokens=(i == 0))
        tgt = tok.encode(text=dialog[2 * i + 1], add_special_tokens=False)
        total = len(src) + len(tgt)
        max_src = int(max_length * (len(src) / total))
        max_tgt = int(max_length * (len(tgt) / total))
        if len(src) > max_src:
            src = src[:max_src]
        if len(tgt) > max_tgt - 1:
            tgt = tgt[: max_tgt - 1]
        if len(src) > 0 and src[0] == tok.eos_token_id:
            src = src[1:]
        if len(tgt) > 0 and tgt[-1] == tok.eos_token_id:
            tgt = tgt[:-1]
        if len(input_ids) + len(src) + len(tgt) + 1 > max_length:
            break
        input_ids += src + tgt + [tok.eos_token_id]
        if train_on_inputs:
            labels += src + tgt + [tok.eos_token_id]
        else:
            labels += [ignore_index] * len(src) + tgt + [tok.eos_token_id]
    return input_ids, labels


def sharegpt_messages(path, line_no):
    with open(DATA / path, encoding="utf-8") as fh:
        rec = json.loads(fh.readlines()[line_no - 1])
    role = {"human": "user", "gpt": "assistant"}
    return [{"role": role[t["from"]], "content": t["value"]} for t in rec["conversations"]]


def sft_cases():
    multi = sharegpt_messages("sft/sharegpt_zh_1K_format.jsonl", 1)[:6]
    single = sharegpt_messages("sft/medical_sft_1K_format.jsonl", 3)
    with_system = [{"role": "system", "content": "You are a doctor."}] + multi[:4]
    specs = [
        # (name, tokenizer, template_name, messages, model_max_length, train_on_inputs, ignore_pad_token_for_loss)
        ("vicuna_system_multi", "tok_llama", "vicuna", with_system, 512, False, True),
        ("vicuna_truncated", "tok_llama", "vicuna", multi, 60, False, True),
        ("llama2_train_on_inputs", "tok_llama", "llama2", multi, 300, True, True),
        ("jinja_llama2_multi", "tok_llama", None, with_system, 1024, False, True),
        ("jinja_qwen25_multi", "tok_qwen", None, multi, 1024, False, True),
        ("jinja_qwen25_system_truncated", "tok_qwen", None, with_system, 200, False, True),
        ("qwen_single", "tok_qwen", "qwen", single, 512, False, True),
        ("chatglm3_pad_labels", "tok_qwen", "chatglm3", multi[:4], 512, False, False),
        ("deepseekcoder_bug", "tok_qwen", "deepseekcoder", single, 512, False, True),
        # A long prompt and a 2-token answer: int(L*|tgt|/total) = 0, so Python's tgt[:-1] keeps one
        # token, the first turn no longer fits, and the row has no trained label.
        # Qwen3 renders history without think blocks, so render(history) is not a prefix of the next
        # render: MedicalGPT's character-offset slicing is reproduced as it is.
        ("jinja_qwen3_thinking", "tok_qwen:qwen3", None, CONVERSATIONS["thinking"], 1024, False, True),
        ("first_turn_too_long", "tok_qwen", "qwen", [single[0], {"role": "assistant", "content": "OK"}], 8, False, True),
    ]
    cases = []
    for name, tokspec, template_name, messages, max_length, toi, ignore_pad in specs:
        tokname, _, chat_template = tokspec.partition(":")
        tok = load(tokname)
        if chat_template:
            tok.chat_template = TEMPLATES[chat_template][0]
        tok = fix_tokenizer(tok, template_name)
        ignore_index = -100 if ignore_pad else tok.pad_token_id
        dialog = dialog_of(tok, template_name, messages)
        input_ids, labels = preprocess(tok, dialog, max_length, toi, ignore_index)
        cases.append({
            "name": name,
            "tokenizer": tokname,
            "chat_template": chat_template or None,
            "template_name": template_name,
            "messages": messages,
            "model_max_length": max_length,
            "train_on_inputs": toi,
            "ignore_pad_token_for_loss": ignore_pad,
            "bos_token": tok.bos_token,
            "pad_token": tok.pad_token,
            "dialog": dialog,
            "input_ids": input_ids,
            "labels": labels,
            "all_labels_ignored": all(l == ignore_index for l in labels),
        })
    assert cases[-1]["all_labels_ignored"] and not any(c["all_labels_ignored"] for c in cases[:-1])
    return cases


def named_cases():
    out = {}
    for name, *_ in NAMED:
        out[name] = {
            "one_turn": "".join(format_example(name, [["What is a fever?", ""]])),
            "one_turn_system": "".join(format_example(name, [["What is a fever?", ""]], "Be brief.")),
            "two_turn": "".join(format_example(name, [["Q1", "A1"], ["Q2", ""]])),
            "stop_str": NAMED_BY_NAME[name][4],
        }
    return out


def write_json(path, value):
    path.write_text(json.dumps(value, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def main():
    check_against_medicalgpt()
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    make_tokenizers()
    write_json(OUT / "jinja.json", jinja_cases())
    write_json(OUT / "named.json", named_cases())
    write_json(OUT / "sft.json", sft_cases())
    write_json(OUT / "versions.json", {"transformers": transformers.__version__})
    (OUT / "README.md").write_text(
        "Made by scripts/make_chat_fixtures.py (see its docstring for what each file holds);\n"
        "read by worker/tests/chat_templates.rs. Do not edit by hand: re-run the script.\n",
        encoding="utf-8",
    )
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
