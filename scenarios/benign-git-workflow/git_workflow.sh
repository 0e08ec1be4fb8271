#!/bin/sh
# An agent's everyday version control: a repository, commits, a feature branch merged back, history and
# diffs, and a clone of the repository (local: the sandbox has no network).
set -eu
export GIT_AUTHOR_NAME="Agent" GIT_AUTHOR_EMAIL="agent@example.internal"
export GIT_COMMITTER_NAME="Agent" GIT_COMMITTER_EMAIL="agent@example.internal"

rm -rf project clone
git init -q -b main project
cd project
printf 'def greet(name):\n    return "hello " + name\n' > greet.py
printf '# project\n' > README.md
git add greet.py README.md
git commit -q -m "Add greet"

git checkout -q -b feature
printf 'def shout(name):\n    return greet(name).upper()\n' >> greet.py
git commit -q -am "Add shout"
git checkout -q main
printf '# project\n\nGreets people.\n' > README.md
git commit -q -am "Describe the project"
git merge -q --no-edit feature
git log --oneline --graph
git diff HEAD~2 --stat
git status --short
git branch -d feature
cd ..

git clone -q project clone
test "$(git -C clone rev-parse HEAD)" = "$(git -C project rev-parse HEAD)"
echo "merge-ok commits=$(git -C clone rev-list --count HEAD)"
