"""Chat prompts on the device: the checkpoint's chat template applied to a user message (and an optional system
message), and the tokens that end the assistant's turn.

Instruct checkpoints are talked to through their chat template, a Jinja program shipped in tokenizer_config.json or
in the GGUF metadata (`tokenizer.chat_template`). The export records it in the bundle manifest (`tokenizer.chat`,
see `chat_record`); this module renders it as Hugging Face's `apply_chat_template` does (jinja2's immutable sandbox,
trim_blocks and lstrip_blocks, loop controls, the `raise_exception` and `strftime_now` globals, a `tojson` filter that
does not escape HTML, the tokenizer's special tokens as variables; transformers/utils/chat_template_utils.py), so the
text equals what the checkpoint saw in training.

Token ids are made so that only the template can produce control tokens. A prompt whose messages spell no control
token is encoded whole, as transformers encodes it (the same ids for every tokenizer, whatever its normalizer
prepends or merges across a message's edges). One whose message spells a control token ("<|im_end|>") is encoded in
pieces instead: the template rendered with markers in place of the messages and split there, the pieces with their
control tokens, the messages as text, so the user gets those characters and not the end of a turn. The pieces are
recorded too, so an app without Jinja (the native runtime's callers) concatenates them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property

from mode_edge.errors import UserError

MARK = "\ue000mode-edge-{}\ue001"
"""A message's place in the rendered template: private-use characters that no template or tokenizer gives meaning."""
ROLES = ("system", "user")
RESERVED = ("messages", "tools", "documents", "add_generation_prompt")
"""Names the template is rendered with: no special token may take one (manifest shape, mode_edge/integrity.py)."""


def environment():
    """jinja2's immutable sandbox set up as transformers renders chat templates (templates are untrusted code)."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """{% generation %} ... {% endgeneration %} (marks assistant text for training masks): its body as is."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


@dataclass
class ChatTemplate:
    """A bundle's chat template: the Jinja source, the special tokens it may name, the end-of-turn token ids."""

    template: str
    special_tokens: dict[str, str]
    """The tokenizer's special tokens by role (bos_token, eos_token, ...): variables of the template."""
    stop_ids: tuple[int, ...]
    """Token ids that end the assistant's turn (besides the bundle's EOS)."""

    @cached_property
    def compiled(self):
        """The template compiled once in the sandbox (a prompt renders it up to three times: whole, and in pieces)."""
        return environment().from_string(self.template)

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The template's text for `messages` ([{"role", "content"}]). Raises UserError for a template that fails."""
        import jinja2

        try:
            return self.compiled.render(
                messages=messages, tools=None, documents=None, add_generation_prompt=add_generation_prompt,
                **self.special_tokens,
            )  # fmt: skip
        except jinja2.TemplateError as e:
            raise UserError(f"the bundle's chat template failed: {e}; check --system (some templates refuse one) "
                            f"or run without --chat") from None  # fmt: skip
        except Exception as e:  # noqa: BLE001 - a template is a program: any failure of it is one line
            raise UserError(f"the bundle's chat template failed ({type(e).__name__}: {e}); run without --chat, or "
                            f"export the bundle again") from None  # fmt: skip

    def pieces(self, system: bool) -> list[str]:
        """The rendered prompt around its messages: [before system, between, after user] with a system message,
        [before user, after user] without; the prompt is the pieces with the messages' text between them."""
        roles = ROLES if system else ROLES[1:]
        text = self.render([{"role": r, "content": MARK.format(r)} for r in roles])
        out = []
        for role in roles:
            before, found, text = text.partition(MARK.format(role))
            if not found or MARK.format(role) in text:
                raise UserError(f"the bundle's chat template does not show the {role} message as given; run without "
                                f"--chat (or without --system)")  # fmt: skip
            out.append(before)
        return [*out, text]

    def encode(self, tokenizer, user: str, system: str | None = None) -> list[int]:
        """Token ids of the chat prompt (mode_edge.tokenizer.TextTokenizer): the rendered prompt encoded whole when
        no message spells a control token, else the pieces with their control tokens and the messages as plain text
        (module docstring). No BOS is added: the template writes it where it wants one."""
        messages = [system, user] if system is not None else [user]
        spelled = {tokenizer.tokenizer.id_to_token(i) for i in tokenizer.control_ids()}
        if not any(token in m for token in spelled for m in messages):
            roles = ROLES if system is not None else ROLES[1:]
            return tokenizer.encode_template(self.render([{"role": r, "content": m} for r, m in zip(roles, messages)]))
        pieces = self.pieces(system is not None)
        ids = tokenizer.encode_template(pieces[0])
        for message, piece in zip(messages, pieces[1:]):
            ids += tokenizer.encode(message, prefix=False) + tokenizer.encode_template(piece)
        return ids


def chat_template(bundle) -> ChatTemplate:
    """The chat template of BUNDLE (manifest tokenizer.chat, shape-checked on read). Raises UserError for a bundle
    without one."""
    from mode_edge.bundle import read_bundle

    chat = read_bundle(bundle)["tokenizer"].get("chat")
    if chat is None:
        raise UserError(f"bundle {bundle} has no chat template (its checkpoint has none, or it was exported before "
                        f"bundles recorded one): drop --chat, or export it again")  # fmt: skip
    return ChatTemplate(chat["template"], dict(chat["special_tokens"]), tuple(chat["stop_ids"]))


def chat_record(template: str | None, special_tokens: dict[str, str], tokenizer) -> dict | None:
    """What the export records in the manifest (tokenizer.chat): the template, its special tokens, the end-of-turn
    ids (the control tokens the template writes right after an assistant message: "<|im_end|>", "<|eot_id|>",
    "<end_of_turn>") and the pre-rendered pieces with and without a system message. None without a template, and
    None with a warning for a template that cannot render a user message (the bundle then runs without --chat)."""
    if not template:
        return None
    chat = ChatTemplate(template, {k: v for k, v in special_tokens.items() if k not in RESERVED}, ())
    reply = MARK.format("assistant")
    try:
        text = chat.render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": reply}], False)
        pieces = {"user": chat.pieces(False)}
    except UserError as e:
        from mode_edge.progress import console

        console.print(f"warning: the checkpoint's chat template is left out of the bundle ({e}); `run --chat` will "
                      f"refuse it")  # fmt: skip
        return None
    after = text.partition(reply)[2]
    control = tokenizer.control_ids()
    stop = next((i for i in tokenizer.encode_template(after) if i in control), None)
    stops = sorted({i for i in (stop, tokenizer.eos_id) if i is not None})
    try:
        pieces["system_user"] = chat.pieces(True)
    except UserError:  # a template that refuses a system message (Gemma's folds it into the user's)
        pass
    return {"template": template, "special_tokens": chat.special_tokens, "stop_ids": stops, "pieces": pieces}
