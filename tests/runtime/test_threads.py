"""thread_map: results in item order, serial or in threads."""

import threading

from pgolf.runtime.threads import thread_map


def test_results_keep_the_item_order_in_threads_and_serially():
    items = list(range(20))
    assert thread_map(lambda x: x * x, items, jobs=4) == [x * x for x in items]
    assert thread_map(lambda x: x * x, items, jobs=1) == [x * x for x in items]
    assert thread_map(lambda x: x, []) == []


def test_jobs_above_one_run_in_other_threads_and_one_runs_in_this_one():
    main = threading.get_ident()
    assert set(thread_map(lambda _: threading.get_ident() == main, range(4), jobs=1)) == {True}
    assert set(thread_map(lambda _: threading.get_ident() == main, range(4), jobs=2)) == {False}
