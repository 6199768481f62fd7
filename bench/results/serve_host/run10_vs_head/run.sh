set -u
P=/work/main/.venv/bin/python
for r in 1 2 3; do
  (cd /tmp/wt10 && PYTHONPATH=/tmp/wt10 timeout 600 $P bench/serve_host.py --repeats 5 --tag _run10_r$r --out /tmp/hostab) > /tmp/hostab/run10_r$r.log 2>&1
  (cd /work/main && PYTHONPATH=/work/main timeout 600 $P bench/serve_host.py --repeats 5 --tag _head_r$r --out /tmp/hostab) > /tmp/hostab/head_r$r.log 2>&1
done
echo done
