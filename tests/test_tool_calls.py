"""Tool calling: the parsers on literal outputs, streamed as OpenAI streams calls; the grammar of forced calls; the
SmolLM2 template; and end to end, the official openai client against a real server of the default model."""

from __future__ import annotations

import json
from collections.abc import Iterator

import jsonschema
import pytest
import requests
from openai import OpenAI
from ports import free_port
from serve_app import served

from serving.config import LimitsConfig, LLMConfig
from serving.engine.llm import LLM
from serving.engine.sampling_params import OutputConstraint, SamplingParams
from serving.server.constraints import request_constraint
from serving.server.http_errors import APIError
from serving.server.openai_protocol import ChatCompletionRequest, ChatMessage, FunctionDefinition
from serving.server.tools.grammar import forced_calls_grammar, text_or_calls_grammar
from serving.server.tools.parsers import HermesParser, Llama3JsonParser, ParsedCall, ToolParser, resolve_parser
from serving.server.tools.request import conversation, plan_tools, request_template, tool_template
from serving.server.tools.stream import ToolCalling
from serving.tokenizer import Tokenizer

# the parsers, on literal outputs

WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, {"note": "a } and a \\" inside"}]}}'
WEATHER_CALL = ParsedCall("get_weather", '{"city": "Paris", "days": [1, {"note": "a } and a \\" inside"}]}')

PARSED = [
    # (parser, output, content, calls)
    (HermesParser(), f"<tool_call>\n{WEATHER}\n</tool_call>", None, [WEATHER_CALL]),
    (HermesParser(), f"Let me look.\n<tool_call>{WEATHER}</tool_call>", "Let me look.\n", [WEATHER_CALL]),
    (
        HermesParser(),
        f'<tool_call>\n{WEATHER}\n</tool_call>\n<tool_call>\n{{"arguments": {{"q": 1}}, "name": "search"}}\n</tool_call>',
        None,
        [WEATHER_CALL, ParsedCall("search", '{"q": 1}')],
    ),
    (HermesParser(), f"<tool_call>\n{WEATHER}", None, [WEATHER_CALL]),  # the closing tag left out at the end
    (HermesParser(), "No tools needed: 4.", "No tools needed: 4.", []),
    (HermesParser(), "A <tool_ tag that is not one", "A <tool_ tag that is not one", []),
    (
        HermesParser(),
        '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',
        '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',
        [],
    ),
    (
        Llama3JsonParser(),
        '{"name": "get_weather", "parameters": {"city": "Paris"}}',
        None,
        [ParsedCall("get_weather", '{"city": "Paris"}')],
    ),
    (
        Llama3JsonParser(),
        'Checking.<|python_tag|>{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {}}',
        "Checking.",
        [ParsedCall("a", '{"x": 1}'), ParsedCall("b", "{}")],
    ),
    (Llama3JsonParser(), '{"parameters": {"x": 2}, "name": "a"}', None, [ParsedCall("a", '{"x": 2}')]),
    (Llama3JsonParser(), "The answer is {1, 2}.", "The answer is {1, 2}.", []),
]
# calls that break after their name: a whole output with one is all content (a stream has sent the call's start)
BROKEN = [
    (HermesParser(), '<tool_call>\n{"name": "f", "arguments": {"a": }\n</tool_call>'),
    (Llama3JsonParser(), '{"name": "a", "parameters": {"x": 1'),
    (Llama3JsonParser(), '{"name": "a", "parameters": {}} trailing words'),
]


@pytest.mark.parametrize("parser, output, content, calls", PARSED + [(parser, output, output, []) for parser, output in BROKEN])
def test_parsers_read_calls_and_fall_back_to_content(parser: ToolParser, output: str, content: str | None, calls: list[ParsedCall]):
    assert parser.parse(output) == (content, calls)


def stream(calling: ToolCalling, output: str, piece: int, finish_reason: str = "stop") -> tuple[str | None, list[dict], str | None]:
    """Feed `output` in pieces of `piece` characters; assemble the deltas as the openai client does."""
    feeder = calling.stream()
    content, calls, finish = "", [], None
    for start in range(0, len(output) + 1, piece):
        last = start + piece > len(output)
        delta, finish = feeder.feed(output[start : start + piece], finish_reason if last else None)
        content += delta.get("content", "")
        for call in delta.get("tool_calls", []):
            if call["index"] == len(calls):
                assert call["function"]["name"] and call["id"].startswith("call_") and call["type"] == "function"
                calls.append({"name": call["function"]["name"], "arguments": ""})
            assert "name" not in call["function"] or call["id"], "the name comes once, with the id"
            calls[call["index"]]["arguments"] += call["function"]["arguments"]
    return content or None, calls, finish


@pytest.mark.parametrize("parser, output, content, calls", PARSED)
@pytest.mark.parametrize("piece", [1, 4, 1000])
def test_streamed_calls_assemble_into_the_whole_message(
    parser: ToolParser, output: str, content: str | None, calls: list[ParsedCall], piece: int
):
    calling = ToolCalling(parser, parallel=True)
    message, finish_reason = calling.message(output, "stop")
    assert stream(calling, output, piece) == (
        message["content"] if calls else output,
        [{"name": c.name, "arguments": c.arguments} for c in calls],
        finish_reason,
    )
    assert finish_reason == ("tool_calls" if calls else "stop")
    assert [c["function"] for c in message.get("tool_calls", [])] == [{"name": c.name, "arguments": c.arguments} for c in calls]


def test_without_parallel_calls_only_the_first_counts():
    output = '<tool_call>{"name": "a", "arguments": {}}</tool_call><tool_call>{"name": "b", "arguments": {}}</tool_call>'
    calling = ToolCalling(HermesParser(), parallel=False)
    message, finish_reason = calling.message(output, "stop")
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["a"] and finish_reason == "tool_calls"
    assert stream(calling, output, 3)[1] == [{"name": "a", "arguments": "{}"}]


def test_a_call_cut_by_max_tokens_says_length():
    calling = ToolCalling(HermesParser(), parallel=True)
    message, finish_reason = calling.message('<tool_call>{"name": "a", "arguments": {"x": ', "length")
    assert message["content"] == '<tool_call>{"name": "a", "arguments": {"x": ' and finish_reason == "length"
    assert stream(calling, '<tool_call>{"name": "a", "arguments": {"x": ', 5, "length") == (
        None,
        [{"name": "a", "arguments": '{"x":'}],
        "length",
    )


def test_auto_picks_the_parser_from_the_chat_template(default_model):
    assert resolve_parser("auto", Tokenizer.from_folder(default_model).chat_template) == "smollm2"
    assert resolve_parser("auto", "{{ '<tool_call>' }}{% for m in messages %}{% endfor %}") == "hermes"
    assert resolve_parser("auto", "{{- '<|python_tag|>' + tool_call.name }}") == "llama3_json"
    assert resolve_parser("auto", "[INST] {{ messages[0]['content'] }} [/INST]") == "none"
    assert resolve_parser("hermes", None) == "hermes"


# the SmolLM2 template


def test_smollm2_template_renders_plain_conversations_as_the_models_own(default_model):
    tokenizer, template = Tokenizer.from_folder(default_model), tool_template("smollm2")
    for turns in (
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
    ):
        for generation_prompt in (True, False):
            ours = tokenizer.apply_chat_template(turns, generation_prompt, chat_template=template)
            assert ours == tokenizer.apply_chat_template(turns, generation_prompt)


def test_smollm2_template_renders_tools_calls_and_results(default_model):
    tokenizer, template = Tokenizer.from_folder(default_model), tool_template("smollm2")
    turns = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": "21 C", "tool_call_id": "c1"},
    ]
    text = tokenizer.apply_chat_template(turns, tools=[{"type": "function", "function": WEATHER_TOOL}], chat_template=template)
    assert text.startswith("<|im_start|>system\nBe brief.\n\n") and json.dumps({"type": "function", "function": WEATHER_TOOL}) in text
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>' in text
    assert text.endswith("<|im_start|>user\n<tool_response>\n21 C\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
    assert text.count("Be brief.") == 1


# what a request's tools fields ask for


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": MODEL, "messages": ASK, "tools": TOOLS} | fields)


def test_tool_choice_decides_what_is_offered_and_enforced():
    limits = LimitsConfig()
    auto = plan_tools(chat(), "smollm2", limits)
    assert auto.calling is not None and auto.tools == TOOLS and not auto.forced and auto.skip_special_tokens is None
    assert auto.constraint is not None and auto.constraint.spec.startswith("start: TEXT | ")
    assert plan_tools(chat(tool_choice="auto"), "llama3_json", limits).constraint is None  # its calls open with no tag in text
    none = plan_tools(chat(tool_choice="none"), "smollm2", limits)
    assert none.calling is None and none.tools is None and none.constraint is None
    named = plan_tools(
        chat(tool_choice={"type": "function", "function": {"name": "get_time"}}, parallel_tool_calls=False), "hermes", limits
    )
    assert named.forced and named.constraint is not None and named.constraint.spec.startswith("start: call\n")
    assert '"const": "get_time"' in named.constraint.spec and "get_weather" not in named.constraint.spec
    required = plan_tools(chat(tool_choice="required"), "llama3_json", limits)
    assert f"{{0,{limits.max_tool_calls - 1}}}" in required.constraint.spec and '"parameters"' in required.constraint.spec
    assert required.skip_special_tokens is False  # <|python_tag|> stays in the text for the parser
    assert plan_tools(chat(tools=None), "smollm2", limits).calling is None


def test_the_shipped_template_renders_only_requests_that_involve_tools():
    """A ChatML model whose template auto maps to the smollm2 parser keeps its own prompt for plain chat."""
    plain = [ChatMessage.model_validate(m) for m in ASK]
    assert request_template("smollm2", None, plain) is None
    assert request_template("smollm2", TOOLS, plain) == tool_template("smollm2")
    call = {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
    history = plain + [
        ChatMessage.model_validate({"role": "assistant", "content": None, "tool_calls": [call]}),
        ChatMessage.model_validate({"role": "tool", "tool_call_id": "call_1", "content": "12:00"}),
    ]
    assert request_template("smollm2", None, history) == tool_template("smollm2")
    assert request_template("hermes", TOOLS, plain) is None  # the model's own template renders tools


def test_another_constraint_wins_over_autos_grammar_and_conflicts_with_forced_calls():
    limits, json_object = LimitsConfig(), {"response_format": {"type": "json_object"}}
    auto = plan_tools(chat(**json_object), "smollm2", limits)
    assert request_constraint(chat(**json_object), limits, auto.constraint, auto.forced) == (
        OutputConstraint("json", '{"type":"object"}'),
        "response_format",
    )
    assert request_constraint(chat(), limits, auto.constraint, auto.forced) == (auto.constraint, "tools")
    required = plan_tools(chat(tool_choice="required", **json_object), "smollm2", limits)
    with pytest.raises(APIError) as refused:
        request_constraint(chat(tool_choice="required", **json_object), limits, required.constraint, required.forced)
    assert refused.value.param == "tools" and "response_format" in refused.value.message


def test_a_model_without_a_parser_takes_tools_only_with_tool_choice_none():
    with pytest.raises(APIError) as refused:
        plan_tools(chat(), "none", LimitsConfig())
    assert refused.value.param == "tools" and "tool_parser" in refused.value.message
    assert plan_tools(chat(tool_choice="none"), "none", LimitsConfig()).calling is None


def test_conversation_gives_templates_arguments_as_objects():
    messages = [
        ChatMessage.model_validate(m)
        for m in [
            {"role": "developer", "content": "Be brief."},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": [1]}'}}],
            },
            {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "ok"}]},
        ]
    ]
    assert conversation(messages) == [
        {"role": "system", "content": "Be brief."},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"a": [1]}}}],
        },
        {"role": "tool", "content": "ok", "tool_call_id": "c1"},
    ]


# forced calls on the engine

WEATHER_TOOL = {
    "name": "get_weather",
    "description": "The weather forecast for a city.",
    "parameters": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 20},
            "unit": {"enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 7},
        },
        "required": ["city", "unit", "days"],
        "additionalProperties": False,
    },
}
TIME_TOOL = {
    "name": "get_time",
    "description": "The local time at a place.",
    "parameters": {
        "$defs": {
            "place": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 20}},
                "required": ["city"],
                "additionalProperties": False,
            }
        },
        "type": "object",
        "properties": {"where": {"$ref": "#/$defs/place"}},
        "required": ["where"],
        "additionalProperties": False,
    },
}
SCHEMAS = {t["name"]: t["parameters"] for t in (WEATHER_TOOL, TIME_TOOL)}


@pytest.fixture(scope="module")
def llm(default_model) -> LLM:
    return LLM(str(default_model), max_model_len=512, kv_cache_memory_gb=0.1)


@pytest.mark.slow
@pytest.mark.parametrize("parser", ["hermes", "llama3_json"])
def test_forced_calls_parse_and_validate_under_sampling(llm, parser):
    functions = [FunctionDefinition.model_validate(t) for t in (WEATHER_TOOL, TIME_TOOL)]
    params = [
        SamplingParams(
            max_tokens=400,
            temperature=1.0,
            seed=seed,
            constraint=OutputConstraint("grammar", forced_calls_grammar(parser, functions, max_calls)),
        )
        for seed in range(3)
        for max_calls in (1, 3)
    ]
    outputs = llm.generate(["Call a tool."] * len(params), params, use_tqdm=False)
    reader = {"hermes": HermesParser(), "llama3_json": Llama3JsonParser()}[parser]
    for out, max_calls in zip(outputs, [1, 3] * 3):
        completion = out.outputs[0]
        content, calls = reader.parse(completion.text)
        assert completion.finish_reason == "stop" and content is None and 1 <= len(calls) <= max_calls, completion.text
        for call in calls:
            jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])


@pytest.mark.slow
def test_auto_leaves_text_free_and_enforces_a_call_once_it_opens(llm):
    functions = [FunctionDefinition.model_validate(t) for t in (WEATHER_TOOL, TIME_TOOL)]
    constraint = OutputConstraint("grammar", text_or_calls_grammar("smollm2", functions, 2))
    prompt = llm.tokenizer.apply_chat_template(ASK, tools=TOOLS, chat_template=tool_template("smollm2"))
    free, bound = SamplingParams(max_tokens=40, temperature=0), SamplingParams(max_tokens=40, temperature=0, constraint=constraint)
    outputs = llm.generate([prompt, prompt], [free, bound], use_tqdm=False)
    assert outputs[0].outputs[0].token_ids == outputs[1].outputs[0].token_ids  # text the grammar leaves alone
    start = llm.engine.grammars.matcher(constraint)

    def accepts(text: str) -> bool:
        matcher = start.deep_copy()
        return all(matcher.consume_token(t) for t in llm.tokenizer.encode(text, add_special_tokens=False))

    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius", "days": 3}}\n</tool_call>'
    assert accepts("Plain text, with a <tool_ tag that is none and {json}.")
    assert accepts(f"Sure. {call}") and accepts(f"Sure. {call}\n{call}")
    assert not accepts(f"Sure. {call}\n{call}\n<tool_call>")  # two calls at most
    assert not accepts(f"{call} and then more text")
    assert not accepts('Sure. <tool_call>\n{"name": "get_forecast"')
    assert not accepts('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "kelvin"')


# end to end, with the openai client

MODEL = "SmolLM2-135M-Instruct"
TOOLS = [{"type": "function", "function": WEATHER_TOOL}, {"type": "function", "function": TIME_TOOL}]
ASK = [{"role": "user", "content": "What is the weather in Paris for the next 3 days?"}]


@pytest.fixture(scope="module")
def server(default_model) -> Iterator[str]:
    config = LLMConfig.model_validate(
        {
            "model": {"source": str(default_model), "max_model_len": 1024},
            "engine": {"kv_cache_memory_gb": 0.1, "max_num_seqs": 8},
            "server": {"port": free_port()},
        }
    )
    with served(config) as url:
        yield url


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0, timeout=120)


def assert_valid_calls(calls) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.slow
def test_models_say_which_tool_parser(client):
    assert client.models.list().data[0].model_extra["tool_parser"] == "smollm2"


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_required_calls_validate(client, seed):
    completion = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", temperature=1.0, seed=seed, max_tokens=400
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert_valid_calls(choice.message.tool_calls)
    assert len(choice.message.tool_calls) <= LimitsConfig().max_tool_calls


@pytest.mark.slow
def test_a_named_function_is_the_one_called_once_without_parallel_calls(client):
    completion = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        parallel_tool_calls=False,
        temperature=1.0,
        seed=3,
        max_tokens=200,
    )
    calls = completion.choices[0].message.tool_calls
    assert_valid_calls(calls)
    assert len(calls) == 1 and calls[0].function.name == "get_time"


@pytest.mark.slow
@pytest.mark.parametrize("tool_choice", ["required", "auto"])
def test_a_streamed_call_assembles_into_the_non_streamed_one(client, tool_choice):
    args = {"model": MODEL, "messages": ASK, "tools": TOOLS, "tool_choice": tool_choice, "temperature": 0, "max_tokens": 400}
    whole = client.chat.completions.create(**args)
    chunks = list(client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    content, calls, finish = "", {}, None
    for chunk in chunks[:-1]:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for call in delta.tool_calls or []:
            if call.id is not None:
                calls[call.index] = {"name": call.function.name, "arguments": ""}
            calls[call.index]["arguments"] += call.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    message = whole.choices[0].message
    expected = [{"name": c.function.name, "arguments": c.function.arguments} for c in message.tool_calls or []]
    assert [calls[i] for i in sorted(calls)] == expected and (content or None) == message.content
    assert finish == whole.choices[0].finish_reason
    assert chunks[-1].usage == whole.usage
    if tool_choice == "required":
        assert finish == "tool_calls" and expected


@pytest.mark.slow
def test_a_tool_result_sent_back_gets_an_answer(client):
    first = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=400)
    call = first.choices[0].message.tool_calls[0]
    history = ASK + [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": call.function.arguments}}
            ],
        },
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"forecast": "sunny", "high_celsius": 24})},
    ]
    answer = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=80)
    choice = answer.choices[0]
    assert choice.finish_reason == "stop" and choice.message.content.strip() and not choice.message.tool_calls
    # the assistant message as the client returned it goes back as it is, too
    again = client.chat.completions.create(
        model=MODEL, messages=[*ASK, first.choices[0].message, history[-1]], tools=TOOLS, temperature=0, max_tokens=40
    )
    assert again.choices[0].finish_reason in ("stop", "tool_calls", "length")


CHAT = {"model": MODEL, "messages": ASK, "max_tokens": 8}
BAD_TOOLS = [
    # (case, body, param, words the message must contain)
    (
        "parameters not a schema",
        CHAT | {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": 5}}}]},
        "tools",
        ["'f'"],
    ),
    (
        "unknown type in parameters",
        CHAT | {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}]},
        "tools",
        ["nonsense"],
    ),
    (
        "parameters not an object schema",
        CHAT | {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
        "tools",
        ["object"],
    ),
    ("parameters not a dict", CHAT | {"tools": [{"type": "function", "function": {"name": "f", "parameters": [1]}}]}, "tools", []),
    ("bad function name", CHAT | {"tools": [{"type": "function", "function": {"name": "two words"}}]}, "tools", []),
    ("two tools of one name", CHAT | {"tools": TOOLS + TOOLS[:1]}, "tools", ["different"]),
    (
        "unknown function in tool_choice",
        CHAT | {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        "tool_choice",
        ["nope"],
    ),
    ("tool_choice without tools", CHAT | {"tool_choice": "required"}, "tool_choice", ["tools"]),
    ("unknown tool_choice", CHAT | {"tools": TOOLS, "tool_choice": "always"}, "tool_choice", []),
    (
        "forced calls and response_format",
        CHAT | {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
        "tools",
        ["response_format"],
    ),
    ("tool message without tool_call_id", CHAT | {"messages": [{"role": "tool", "content": "x"}]}, "messages", ["tool_call_id"]),
    ("null content from the user", CHAT | {"messages": [{"role": "user", "content": None}]}, "messages", []),
    (
        "arguments not JSON",
        CHAT
        | {
            "messages": [
                *ASK,
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{oops"}}],
                },
            ]
        },
        "messages",
        ["arguments"],
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize("case, body, param, words", BAD_TOOLS, ids=[c[0] for c in BAD_TOOLS])
def test_bad_tools_get_openai_errors(server, case, body, param, words):
    response = requests.post(f"{server}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert all(word in error["message"] for word in words), error["message"]


@pytest.mark.slow
def test_server_is_healthy_after_bad_tools(server, client):
    assert requests.get(f"{server}/health", timeout=30).status_code == 200
    test_required_calls_validate(client, 0)
