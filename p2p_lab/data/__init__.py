"""Task data for training and evaluation: converters of ../shared/data, user-disjoint splits, LaMP import.

    from p2p_lab.data import load_task
    td = load_task("movielens-rating")   # TaskData(card, train, val, test, ood, stats)
"""

from p2p_lab.data.prepare import TASKS, TaskData, load_task, prepare_task

__all__ = ["TASKS", "TaskData", "load_task", "prepare_task"]
