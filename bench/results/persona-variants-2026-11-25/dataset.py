"""usage: dataset.py OUT_DIR PERSONA_SHARE: the Hatter dataset from the default book with that persona share."""
import shutil
import sys
from wonderland.data import build_dataset
share=float(sys.argv[2]); out=sys.argv[1]; shutil.rmtree(out, ignore_errors=True)
st=build_dataset(None,"Hatter",out,persona_share=share)
print({k:st[k] for k in ("dialogue_records","persona_records","train_records","valid_records")})
