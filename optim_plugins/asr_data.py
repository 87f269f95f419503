"""Spoken digits made offline for the ASR recipe: a SYNTHETIC stand-in for recorded speech.

No text-to-speech engine is used (espeak-ng is not assumed) and nothing is downloaded: each letter
of a digit word ("zero" ... "nine") is rendered as a short voiced segment whose two formant-like tones
come from a fixed table, on a pitch harmonic, with a smooth envelope, so the audio is a deterministic
function of the spelling, the speaker and a seed. Speakers vary pitch, speaking rate, "vocal-tract"
scale (all formants shifted together), loudness and noise level. Utterances are one to a few digit
words separated by short pauses, with background noise.

It is good for what the recipe shows (a CTC model and an optimizer learning to map audio to
characters, CER/WER falling) and not for anything about real speech: the "phones" are per letter,
not per sound, and there is no coarticulation, no prosody and no real voice.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
BLANK = "<blank>"  # CTC blank, also the padding id 0
VOCAB: tuple[str, ...] = (BLANK, " ", *sorted(set("".join(DIGITS))))
CHAR_TO_ID = {c: i for i, c in enumerate(VOCAB)}


def _formant_table() -> dict[str, tuple[float, float]]:
    """Letter -> (f1, f2) in Hz, fixed (seeded), spread over the vowel-like range."""
    g = np.random.default_rng(1234)
    letters = VOCAB[2:]
    f1 = 250 + 650 * g.random(len(letters))
    f2 = 900 + 1800 * g.random(len(letters))
    return {c: (float(a), float(b)) for c, a, b in zip(letters, f1, f2)}


FORMANTS = _formant_table()


@dataclass(frozen=True)
class Speaker:
    pitch: float  # Hz of the voicing tone
    rate: float   # > 1 speaks faster
    scale: float  # multiplies every formant (vocal-tract length)
    gain: float
    noise: float  # standard deviation of the background noise, relative to the voice


def speaker(index: int, noise: float = 0.05) -> Speaker:
    """Speaker ``index`` (deterministic): pitch 90-250 Hz, rate 0.8-1.25, formant scale 0.9-1.1."""
    u = np.random.default_rng(10_000 + index).random(5).tolist()
    return Speaker(pitch=90 + 160 * u[0], rate=0.8 + 0.45 * u[1], scale=0.9 + 0.2 * u[2], gain=0.5 + 0.5 * u[3],
                   noise=noise * (0.5 + u[4]))


def render(text: str, who: Speaker, sample_rate: int = 8000, letter_ms: float = 55.0, pause_ms: float = 90.0,
           rng: np.random.Generator | None = None) -> torch.Tensor:
    """The waveform (float32, 1-D) of ``text`` (digit words separated by spaces) spoken by ``who``."""
    rng = rng or np.random.default_rng(0)
    pieces = [np.zeros(int(sample_rate * pause_ms / 2000))]
    for w, word in enumerate(text.split(" ")):
        if w:
            pieces.append(np.zeros(int(sample_rate * pause_ms / 1000 / who.rate * rng.uniform(0.7, 1.3))))
        for letter in word:
            f1, f2 = FORMANTS[letter]
            n = int(sample_rate * letter_ms / 1000 / who.rate * rng.uniform(0.85, 1.15))
            t = np.arange(n) / sample_rate
            pitch = who.pitch * rng.uniform(0.985, 1.015)
            voice = (0.4 * np.sin(2 * np.pi * pitch * t)
                     + np.sin(2 * np.pi * f1 * who.scale * t) + 0.6 * np.sin(2 * np.pi * f2 * who.scale * t))
            envelope = np.sin(np.pi * np.arange(n) / n) ** 0.5  # a dip to 0 between letters
            pieces.append(who.gain * envelope * voice)
    pieces.append(np.zeros(int(sample_rate * pause_ms / 2000)))
    wave = np.concatenate(pieces)
    return torch.from_numpy((wave + who.noise * rng.standard_normal(wave.shape)).astype(np.float32))


def utterances(count: int, seed: int, speakers: range, min_words: int = 1, max_words: int = 3,
               sample_rate: int = 8000, noise: float = 0.05) -> list[tuple[torch.Tensor, str]]:
    """``count`` (waveform, text) pairs: random digit strings of ``min_words``..``max_words`` words,
    each by a speaker drawn from ``speakers``; deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        words = int(rng.integers(min_words, max_words + 1))
        text = " ".join(DIGITS[int(i)] for i in rng.integers(0, 10, words))
        who = speaker(speakers[int(rng.integers(0, len(speakers)))], noise)
        out.append((render(text, who, sample_rate, rng=rng), text))
    return out


def encode(text: str) -> list[int]:
    return [CHAR_TO_ID[c] for c in text]


def ctc_decode(ids: list[int]) -> str:
    """Greedy CTC: merge repeats, drop blanks (and padding ids < 0)."""
    out, previous = [], None
    for i in ids:
        if i != previous and i > 0:
            out.append(VOCAB[i])
        previous = i
    return "".join(out).strip()
