"""Rows -> chat messages: the recipe's two prompts (verbatim) and the placing of images at the
`<image>` markers of a row's text."""

from __future__ import annotations

from dataclasses import dataclass

IMAGE_MARKER = "<image>"


# The recipe's two prompts, verbatim (paper Tables 7 and 8; they are data, not prose to edit).
# RL: prepended to every problem inside the user turn, joined by one space (released training code).
RL_INSTRUCTION = (
    "A conversation between User and Assistant. The User provides an image and asks a question. The Assistant "
    "first analyzes both the image and the question, then carefully thinks about the reasoning process step by "
    "step, and finally provides the User with an accurate answer. The Assistant must carefully checkout the "
    "correctness and validity of each reasoning step. If any errors or inconsistencies are found during the "
    "reasoning process, the Assistant reflects and corrects them logically. The reasoning process and answer are "
    "enclosed within <think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning process "
    "here, with potential reflections and corrections </think><answer> final answer here, with the key result "
    "enclosed in \\boxed{} </answer>."
)


# Evaluation: the system prompt of every benchmark question.
EVAL_SYSTEM_PROMPT = (
    "Please solve the problem step by step and put your answer in one \\boxed{}. "
    "If it is a multiple-choice question, only one letter should appear inside the \\boxed{}."
)


INSTRUCTIONS = {"recipe": RL_INSTRUCTION}  # names a --instruction flag may use instead of the text


@dataclass(frozen=True)
class PromptFormat:
    """How a row's problem becomes a chat prompt."""

    instruction: str = ""  # before the problem in the user turn, one space between (RL_INSTRUCTION; toy: empty)
    system: str = ""  # the system message (EVAL_SYSTEM_PROMPT for evaluation); empty: the chat template's default


def user_content(text: str, n_images: int) -> list[dict]:
    """Typed chat content: text split at `<image>` markers, images placed there (with no marker, before
    the text). ValueError when the markers and images disagree in number."""
    n_markers = text.count(IMAGE_MARKER)
    if n_markers == 0:
        parts: list[dict] = [{"type": "image"} for _ in range(n_images)]
        return parts + ([{"type": "text", "text": text}] if text else [])
    if n_markers != n_images:
        raise ValueError(f"{n_markers} <image> markers but {n_images} images")
    parts = []
    for i, chunk in enumerate(text.split(IMAGE_MARKER)):
        if i > 0:
            parts.append({"type": "image"})
        if chunk:
            parts.append({"type": "text", "text": chunk})
    return parts


def prompt_messages(row: dict, fmt: PromptFormat = PromptFormat()) -> list[dict]:
    """Chat messages of an RL/eval row: an optional system turn, then one user turn holding
    `fmt.instruction + " " + problem` with the row's images at its `<image>` markers."""
    text = f"{fmt.instruction} {row['problem']}" if fmt.instruction else row["problem"]
    system = [{"role": "system", "content": fmt.system}] if fmt.system else []
    return system + [{"role": "user", "content": user_content(text, len(row.get("images") or []))}]


def sft_messages(row: dict) -> list[dict]:
    """Chat messages of an SFT row with the `<image>` markers of the user turns turned into parts:
    images in order to the markers of successive user turns (no marker anywhere: all to the first)."""
    images = list(row.get("images") or [])
    any_marker = any(IMAGE_MARKER in m["content"] for m in row["messages"] if isinstance(m["content"], str))
    first_user = next((i for i, m in enumerate(row["messages"]) if m["role"] == "user"), None)
    used, out = 0, []
    for i, m in enumerate(row["messages"]):
        content = m["content"]
        if m["role"] == "user" and isinstance(content, str):
            k = content.count(IMAGE_MARKER) if any_marker else (len(images) if i == first_user else 0)
            content = user_content(content, k) if k or IMAGE_MARKER in content else content
            used += k
        out.append({"role": m["role"], "content": content})
    if used != len(images):
        raise ValueError(f"{used} <image> markers but {len(images)} images")
    return out
