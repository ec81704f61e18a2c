"""An msrun worker for tests/test_tp_front_ends.py: both ranks generate, and rank 1 is killed
(SIGKILL) at its third engine step. Rank 0 must say so once and stop; msrun must end the launch.

    tp_dies.py front_end   # rank 0 drives generation through run_front_end, rank 1 follows it
    tp_dies.py spmd        # a plain SPMD script: every rank calls generate itself
"""
import os
import signal
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def main():
    import mindspore as ms
    ms.set_device("CPU")
    import numpy as np
    import mindglm
    from mindglm.parallel.lockstep import run_front_end
    model = mindglm.load_model(os.path.join(HERE, "fixtures", "models", "chatglm2-tiny"), tensor_parallel=2)
    if model.parallel.rank == 1:
        runner = model.engine_for(True).runner
        execute, calls = runner.execute, []

        def dying(plan):
            calls.append(plan)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            return execute(plan)
        runner.execute = dying

    def generate():
        return model.generate(np.arange(5, 15)[None], max_new_tokens=20, eos_token_id=-1)
    if sys.argv[1] == "spmd":
        generate()
    else:
        run_front_end(model, generate)
    print("rank", model.parallel.rank, "finished", flush=True)


if __name__ == "__main__":
    main()
