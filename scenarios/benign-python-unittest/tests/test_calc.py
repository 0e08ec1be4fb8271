import unittest

from calc import evaluate, tokenize


class TokenizeTest(unittest.TestCase):
    def test_numbers_and_operators(self) -> None:
        self.assertEqual(tokenize("1 + 22*3"), ["1", "+", "22", "*", "3"])

    def test_decimals(self) -> None:
        self.assertEqual(tokenize("3.25/2"), ["3.25", "/", "2"])

    def test_rejects_letters(self) -> None:
        with self.assertRaises(ValueError):
            tokenize("2 + x")


class EvaluateTest(unittest.TestCase):
    def test_precedence(self) -> None:
        self.assertEqual(evaluate("2 + 3 * 4"), 14)

    def test_parentheses(self) -> None:
        self.assertEqual(evaluate("(2 + 3) * 4"), 20)

    def test_unary_minus(self) -> None:
        self.assertEqual(evaluate("-3 * -(2 + 1)"), 9)

    def test_left_associative(self) -> None:
        self.assertEqual(evaluate("10 - 4 - 3"), 3)
        self.assertEqual(evaluate("64 / 4 / 2"), 8)

    def test_division_by_zero(self) -> None:
        with self.assertRaises(ZeroDivisionError):
            evaluate("1 / (2 - 2)")

    def test_unbalanced(self) -> None:
        with self.assertRaises(ValueError):
            evaluate("(1 + 2")

    def test_trailing_garbage(self) -> None:
        with self.assertRaises(ValueError):
            evaluate("1 2")


if __name__ == "__main__":
    unittest.main()
