"""The agents llmos ships: a general assistant that plans over the caller's tools, and a summarizer."""

from agents.builtin.assistant import ASSISTANT
from agents.builtin.summarizer import Summarizer

BUILTIN_AGENTS = (ASSISTANT, Summarizer())
