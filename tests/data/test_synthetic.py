"""Embedded synthetic problems: determinism, disjoint splits, solutions and the verifier."""

import collections
import re

from data import synthetic


def test_problems_are_deterministic_and_cover_every_family_level_and_language():
  a = synthetic.SyntheticProblems(num_examples=400, seed=3)
  b = synthetic.SyntheticProblems(num_examples=400, seed=3)
  assert [a[i] for i in range(0, 400, 7)] == [b[i] for i in range(0, 400, 7)]
  problems = [a.problem(i) for i in range(400)]
  assert {p.family for p in problems} == set(synthetic.FAMILIES)
  assert {p.level for p in problems} == {1, 2, 3}
  assert {p.language for p in problems} == {'en', 'zh'}
  assert any(re.search('[\u4e00-\u9fff]', p.question) for p in problems)
  other = synthetic.SyntheticProblems(num_examples=400, seed=4)
  assert sum(a[i] == other[i] for i in range(400)) < 40


def test_train_and_test_never_share_a_problem():
  train = synthetic.SyntheticProblems('train', num_examples=4000)
  test = synthetic.SyntheticProblems('test', num_examples=400)
  train_keys = {train.problem(i).key for i in range(len(train))}
  test_keys = {test.problem(i).key for i in range(len(test))}
  assert not train_keys & test_keys
  assert len(test_keys) > 300    # the test split is not a handful of repeats


def test_solutions_verify_and_wrong_solutions_do_not():
  problems = synthetic.SyntheticProblems(num_examples=600, seed=1)
  by_family = collections.Counter()
  for i in range(len(problems)):
    p = problems.problem(i)
    assert p.solution.endswith(f'#### {p.answer}') and p.solution.count('\n') >= 1
    assert synthetic.verify(p.solution, p.answer)
    assert not synthetic.verify(p.wrong_solution, p.answer)
    assert p.wrong_answer != p.answer
    by_family[p.family] += 1
  assert min(by_family.values()) > 100


def test_chickens_and_rabbits_answers_are_correct():
  problems = synthetic.SyntheticProblems(num_examples=300, families=('chickens_rabbits',),
                                         languages=('en',))
  for i in range(len(problems)):
    p = problems.problem(i)
    heads, legs = map(int, re.findall(r'\d+', p.question)[:2])
    rabbits = (legs - 2 * heads) // 2
    want = rabbits if 'rabbits are' in p.question else heads - rabbits
    assert int(p.answer) == want and 0 < want < heads


def test_verifier_extracts_final_answers():
  assert synthetic.extract_answer('so 3 + 4 = 7\n#### 1,234') == '1234'
  assert synthetic.extract_answer('The answer is 42.') == '42'
  assert synthetic.extract_answer('#### -3.50') == '-3.5'
  assert synthetic.extract_answer('no number here') is None
  assert synthetic.verify('blah\n#### 12', '12.0')
  assert not synthetic.verify('blah\n#### 13', '12')
