"""A separate process that fills one LLM signal for N examples against an OpenAI-compatible server
(for the concurrent-runs drill).

usage: python judge_worker.py HOME SERVER_URL N
Prints "computed reused by_others" when done.
"""

import os
import sys


def main() -> None:
    home, url, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    os.environ.update(SFT_SELECT_HOME=home, OPENAI_BASE_URL=url, OPENAI_API_KEY="sk-test-worker")

    from sft_select.tasks.signal_task import DatasetRef, fill_signal
    from sft_select.tasks.judge import Prompt, first_number, llm_batch_of, llm_signal

    prompt = Prompt(name="worker_rating", version="1", template="Rate: {instruction}",
                    parse=lambda raw: first_number(raw, low=0, high=5), max_tokens=8)
    data = DatasetRef.load("pool")  # registered by the test, N examples
    assert data.rows == n
    ref = fill_signal(llm_signal(prompt, "openai:judge-worker"), data, llm_batch_of, batch_size=4)
    print(ref.computed, ref.reused, ref.by_others, flush=True)


if __name__ == "__main__":
    main()
