"""``fwdgrad train`` whose rank 1 crashes once, after epoch ``FWDGRAD_TEST_FAIL_AFTER_EPOCH``.

For test_distributed_cli.py's restart test, run by torchrun in place of ``-m fwdgrad``:
the first attempt's rank 1 leaves ``FWDGRAD_TEST_FAIL_FLAG`` behind and ends with
``os._exit(17)`` (a crash: no cleanup); torchrun (``--max-restarts=1``) then restarts every
process, and the restarted ones find the flag and train to the end.
"""

import os
import sys

from fwdgrad.experiments.cli import main
from fwdgrad.train import trainer as training

FLAG = os.environ["FWDGRAD_TEST_FAIL_FLAG"]
AFTER_EPOCH = int(os.environ["FWDGRAD_TEST_FAIL_AFTER_EPOCH"])
_end_epoch = training.Trainer._end_epoch


def _end_epoch_then_crash(self, row):
    _end_epoch(self, row)
    if self.state.epoch == AFTER_EPOCH and os.environ["RANK"] == "1" and not os.path.exists(FLAG):
        open(FLAG, "w").close()
        os._exit(17)


training.Trainer._end_epoch = _end_epoch_then_crash

if __name__ == "__main__":
    sys.exit(main())
