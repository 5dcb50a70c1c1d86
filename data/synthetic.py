"""Embedded tasks: verifiable arithmetic and word problems generated on the fly, no download.

Problem ``i`` of a split is a pure function of ``(seed, split, i)``, so the corpus is random
access and identical on every machine. Train and test never share a problem: each problem's
canonical key (its family and numbers, not its wording) is hashed with the seed, and the hash
decides which split may hold it; a generator draw that lands in the other split is redrawn.

Every problem has a worked step-by-step solution ending in ``#### <answer>`` (the GSM8K
convention), a verifier that extracts and checks the final answer, and a plausible wrong
solution for preference pairs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import re
from collections.abc import Callable, Sequence


LANGUAGES = ('en', 'zh')
SPLITS = ('train', 'test')


@dataclasses.dataclass(frozen=True)
class Problem:
  """One generated problem with its solution and a wrong solution that looks plausible."""
  family: str
  level: int
  language: str
  key: str              # canonical content (family + numbers); decides the split
  question: str
  solution: str         # worked steps, ending in '#### <answer>'
  answer: str
  wrong_solution: str   # same style, wrong final answer
  wrong_answer: str

  def as_record(self) -> dict:
    """The dict a source yields (same fields as the GSM8K source, plus metadata)."""
    return {'question': self.question, 'answer': self.solution, 'final_answer': self.answer,
            'rejected_answer': self.wrong_solution, 'family': self.family, 'level': self.level,
            'language': self.language}


def _fmt(x: int) -> str:
  return str(int(x))


def _finish(steps: Sequence[str], answer: int) -> str:
  return '\n'.join(steps) + f'\n#### {_fmt(answer)}'


def _arithmetic(rng: random.Random, level: int, lang: str) -> Problem:
  """Evaluate an expression of ``level + 1`` operands with + - * and the usual precedence."""
  hi = 10 ** min(level + 1, 4)
  nums = [rng.randrange(1, hi) for _ in range(level + 1)]
  ops = [rng.choice('+-*') for _ in range(level)]
  expr = ' '.join([_fmt(nums[0])] + [f'{o} {_fmt(n)}' for o, n in zip(ops, nums[1:])])
  # Collapse products first, then sums left to right, writing each step.
  terms, signs, steps = [nums[0]], [], []
  for o, n in zip(ops, nums[1:]):
    if o == '*':
      steps.append(f'{_fmt(terms[-1])} * {_fmt(n)} = {_fmt(terms[-1] * n)}')
      terms[-1] *= n
    else:
      terms.append(n)
      signs.append(o)
  total = terms[0]
  for s, t in zip(signs, terms[1:]):
    new = total + t if s == '+' else total - t
    steps.append(f'{_fmt(total)} {s} {_fmt(t)} = {_fmt(new)}')
    total = new
  if not steps:
    steps.append(f'{expr} = {_fmt(total)}')
  # A classic slip: evaluating strictly left to right (ignoring precedence), or off by one step.
  naive = nums[0]
  for o, n in zip(ops, nums[1:]):
    naive = naive + n if o == '+' else naive - n if o == '-' else naive * n
  wrong = naive if naive != total else total + rng.choice((-10, -1, 1, 10))
  wrong_steps = steps[:-1] + [f'{steps[-1].rsplit("=", 1)[0]}= {_fmt(wrong)}']
  if lang == 'zh':
    q = f'计算：{expr} = ?'
    steps = ['先算乘法，再从左到右算加减。'] + steps
    wrong_steps = ['先算乘法，再从左到右算加减。'] + wrong_steps
  else:
    q = f'Compute {expr}.'
    steps = ['Multiply first, then add and subtract from left to right.'] + steps
    wrong_steps = ['Multiply first, then add and subtract from left to right.'] + wrong_steps
  return Problem('arithmetic', level, lang, f'arithmetic:{expr}', q, _finish(steps, total),
                 _fmt(total), _finish(wrong_steps, wrong), _fmt(wrong))


def _chickens_rabbits(rng: random.Random, level: int, lang: str) -> Problem:
  """Heads and legs are given; count chickens (2 legs) and rabbits (4 legs)."""
  hi = (25, 80, 400)[min(level, 3) - 1]
  chickens, rabbits = rng.randrange(1, hi), rng.randrange(1, hi)
  heads, legs = chickens + rabbits, 2 * chickens + 4 * rabbits
  ask_rabbits = rng.random() < 0.5 if level > 1 else True
  answer = rabbits if ask_rabbits else chickens
  # Plausible slip: dividing the extra legs by 4 instead of 2.
  wrong_r = (legs - 2 * heads) // 4
  wrong = wrong_r if ask_rabbits else heads - wrong_r
  if wrong == answer:
    wrong = answer + 1
  key = f'chickens_rabbits:{heads}:{legs}:{"r" if ask_rabbits else "c"}'
  if lang == 'zh':
    animal = '兔' if ask_rabbits else '鸡'
    q = f'笼子里有鸡和兔，共有{heads}个头，{legs}只脚。问{animal}有几只？'
    steps = [f'假设全是鸡，共有 {heads} * 2 = {2 * heads} 只脚。',
             f'多出的脚：{legs} - {2 * heads} = {legs - 2 * heads}。',
             f'每只兔比鸡多 2 只脚，所以兔有 {legs - 2 * heads} / 2 = {rabbits} 只。',
             f'鸡有 {heads} - {rabbits} = {chickens} 只。']
    wrong_steps = steps[:2] + [f'每只兔有 4 只脚，所以兔有 {legs - 2 * heads} / 4 = {wrong_r} 只。',
                               f'鸡有 {heads} - {wrong_r} = {heads - wrong_r} 只。']
  else:
    animal = 'rabbits' if ask_rabbits else 'chickens'
    q = (f'A farm has chickens and rabbits. There are {heads} heads and {legs} legs in total. '
         f'How many {animal} are there?')
    steps = [f'If all {heads} animals were chickens there would be {heads} * 2 = {2 * heads} legs.',
             f'The extra legs are {legs} - {2 * heads} = {legs - 2 * heads}.',
             f'Each rabbit adds 2 legs, so there are {legs - 2 * heads} / 2 = {rabbits} rabbits.',
             f'The chickens are {heads} - {rabbits} = {chickens}.']
    wrong_steps = steps[:2] + [
        f'Each rabbit has 4 legs, so there are {legs - 2 * heads} / 4 = {wrong_r} rabbits.',
        f'The chickens are {heads} - {wrong_r} = {heads - wrong_r}.']
  return Problem('chickens_rabbits', level, lang, key, q, _finish(steps, answer), _fmt(answer),
                 _finish(wrong_steps, wrong), _fmt(wrong))


def _shopping(rng: random.Random, level: int, lang: str) -> Problem:
  """Buy some items at a unit price, pay with a note, find the change."""
  items = [('apples', '苹果'), ('pencils', '铅笔'), ('notebooks', '笔记本'), ('oranges', '橙子'),
           ('cakes', '蛋糕'), ('books', '书'), ('toys', '玩具'), ('cups', '杯子')]
  name_en, name_zh = items[rng.randrange(len(items))]
  count = rng.randrange(2, (10, 25, 60)[min(level, 3) - 1])
  price = rng.randrange(1, (10, 30, 90)[min(level, 3) - 1])
  cost = count * price
  paid = next(n for n in (10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000) if n >= cost)
  change = paid - cost
  wrong = paid - count - price  # adds count and price instead of multiplying
  if wrong == change:
    wrong = change + price
  key = f'shopping:{name_en}:{count}:{price}:{paid}'
  if lang == 'zh':
    q = f'每个{name_zh}{price}元，买{count}个，付了{paid}元，应找回多少元？'
    steps = [f'总价：{count} * {price} = {cost} 元。', f'找回：{paid} - {cost} = {change} 元。']
    wrong_steps = [f'总价：{count} + {price} = {count + price} 元。',
                   f'找回：{paid} - {count + price} = {wrong} 元。']
  else:
    q = (f'{name_en.capitalize()} cost {price} dollars each. Sam buys {count} {name_en} and pays '
         f'with {paid} dollars. How much change does Sam get?')
    steps = [f'The {name_en} cost {count} * {price} = {cost} dollars.',
             f'The change is {paid} - {cost} = {change} dollars.']
    wrong_steps = [f'The {name_en} cost {count} + {price} = {count + price} dollars.',
                   f'The change is {paid} - {count + price} = {wrong} dollars.']
  return Problem('shopping', level, lang, key, q, _finish(steps, change), _fmt(change),
                 _finish(wrong_steps, wrong), _fmt(wrong))


def _travel(rng: random.Random, level: int, lang: str) -> Problem:
  """Distance from speed and time: one leg at level 1, two legs (summed) above."""
  legs = 1 if level == 1 else 2
  top = (60, 90, 120)[min(level, 3) - 1]
  trips = [(rng.randrange(10, top), rng.randrange(1, 3 + 2 * level)) for _ in range(legs)]
  parts = [v * t for v, t in trips]
  answer = sum(parts)
  # Plausible slip: multiplying the summed speeds by the summed hours.
  if legs > 1:
    wrong = sum(v for v, _ in trips) * sum(t for _, t in trips)
  else:
    wrong = trips[0][0] + trips[0][1]
  if wrong == answer:
    wrong = answer + trips[0][0]
  key = 'travel:' + ':'.join(f'{v}x{t}' for v, t in trips)
  if lang == 'zh':
    q = ('一辆车' + '，然后'.join(f'以每小时{v}千米的速度行驶{t}小时' for v, t in trips)
         + '。一共行驶了多少千米？')
    steps = [f'{v} * {t} = {d} 千米。' for (v, t), d in zip(trips, parts)]
    if legs > 1:
      steps.append(f'合计：{" + ".join(map(str, parts))} = {answer} 千米。')
  else:
    q = ('A car drives ' + ', then '.join(f'{t} hours at {v} km/h' for v, t in trips)
         + '. How many kilometres does it drive in total?')
    steps = [f'{t} hours at {v} km/h is {v} * {t} = {d} km.' for (v, t), d in zip(trips, parts)]
    if legs > 1:
      steps.append(f'In total {" + ".join(map(str, parts))} = {answer} km.')
  if legs > 1:
    sv, st = sum(v for v, _ in trips), sum(t for _, t in trips)
    wrong_steps = [f'{" + ".join(str(v) for v, _ in trips)} = {sv}',
                   f'{" + ".join(str(t) for _, t in trips)} = {st}', f'{sv} * {st} = {wrong}']
  else:
    v, t = trips[0]
    wrong_steps = [f'{v} + {t} = {wrong}']
  return Problem('travel', level, lang, key, q, _finish(steps, answer), _fmt(answer),
                 _finish(wrong_steps, wrong), _fmt(wrong))


FAMILIES: dict[str, Callable[[random.Random, int, str], Problem]] = {
    'arithmetic': _arithmetic,
    'chickens_rabbits': _chickens_rabbits,
    'shopping': _shopping,
    'travel': _travel,
}


def split_of(key: str, seed: int, test_fraction: float) -> str:
  """The split a problem's canonical key belongs to (fixed by seed, independent of wording)."""
  digest = hashlib.blake2b(f'{seed}:{key}'.encode(), digest_size=8).digest()
  return 'test' if int.from_bytes(digest, 'little') / 2.0**64 < test_fraction else 'train'


class SyntheticProblems:
  """A random-access sequence of problems for one split; ``len`` is ``num_examples``."""

  def __init__(self, split: str = 'train', *, seed: int = 0, num_examples: int = 100_000,
               families: Sequence[str] = tuple(FAMILIES), levels: Sequence[int] = (1, 2, 3),
               languages: Sequence[str] = LANGUAGES, test_fraction: float = 0.1):
    if split not in SPLITS:
      raise ValueError(f'synthetic split must be one of {SPLITS}, got {split!r}')
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
      raise ValueError(f'unknown synthetic families {unknown}; choose from {sorted(FAMILIES)}')
    bad_lang = [x for x in languages if x not in LANGUAGES]
    if bad_lang:
      raise ValueError(f'unknown languages {bad_lang}; choose from {LANGUAGES}')
    if not 0.0 < test_fraction < 1.0:
      raise ValueError(f'test_fraction must be in (0, 1), got {test_fraction}')
    self.split, self.seed, self.num_examples = split, seed, num_examples
    self.families, self.levels, self.languages = tuple(families), tuple(levels), tuple(languages)
    self.test_fraction = test_fraction

  def __len__(self) -> int:
    return self.num_examples

  def problem(self, index: int) -> Problem:
    """Problem ``index``: redraws until the problem belongs to this split."""
    if not 0 <= index < self.num_examples:
      raise IndexError(f'synthetic {self.split} index {index} is outside '
                       f'[0, {self.num_examples})')
    split_code = SPLITS.index(self.split)
    for attempt in range(1000):
      # String seeds go through SHA-512: the same problem on every machine and Python build.
      rng = random.Random(f'{self.seed}:{split_code}:{index}:{attempt}')
      family = self.families[rng.randrange(len(self.families))]
      level = int(self.levels[rng.randrange(len(self.levels))])
      lang = self.languages[rng.randrange(len(self.languages))]
      p = FAMILIES[family](rng, level, lang)
      if split_of(p.key, self.seed, self.test_fraction) == self.split:
        return p
    raise RuntimeError(f'no {self.split} problem found for index {index}: the split is too small')

  def __getitem__(self, index: int) -> dict:
    return self.problem(int(index)).as_record()


_FINAL_RE = re.compile(r'####\s*(-?[\d,]*\.?\d+)')
_NUMBER_RE = re.compile(r'-?\d[\d,]*\.?\d*')


def extract_answer(text: str) -> str | None:
  """The final answer of a solution: the number after ``####``, else the last number."""
  m = _FINAL_RE.search(text)
  if m:
    raw = m.group(1)
  else:
    nums = _NUMBER_RE.findall(text)
    if not nums:
      return None
    raw = nums[-1]
  raw = raw.replace(',', '').rstrip('.')
  try:
    value = float(raw)
  except ValueError:
    return None
  return _fmt(value) if value == int(value) else repr(value)


def verify(text: str, answer: str) -> bool:
  """True when the final answer extracted from ``text`` equals ``answer`` numerically."""
  got = extract_answer(text)
  want = extract_answer(f'#### {answer}')
  return got is not None and got == want
