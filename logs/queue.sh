#!/bin/bash
cd /work/main
while kill -0 19414 2>/dev/null; do sleep 10; done
.venv/bin/python benchmarks/evidence4.py --teacher runs/r4/teacher-r20/best.pt --lt-teacher runs/r4/teacher-r20-lt/best.pt --out runs/r4/evidence --settings 'B: pruning the full pool at equal steps' > logs/B.log 2>&1
.venv/bin/python benchmarks/evidence4.py --teacher runs/r4/teacher-r20/best.pt --lt-teacher runs/r4/teacher-r20-lt/best.pt --out runs/r4/evidence --settings 'A: temperature rules, resnet8 student' > logs/A.log 2>&1
