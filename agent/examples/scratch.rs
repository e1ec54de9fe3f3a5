fn main() {
    let v = serde_json::json!({
        "a": 1e300, "b": 1e-7, "c": 0.1, "d": 100.0, "e": 1.5e20, "f": -0.0, "g": 123456789.125, "h": 5e-324, "i": 1e21, "j": 1e15,
        "lead": "  leading\nb\n", "trailsp": "a \nb", "tabs": "\tx\ny", "onlynl": "\n", "twonl": "\n\n", "crlf": "a\r\nb\n", "spaceonly": "   ", "nlspace": "a\n ", "hashml": "# c\nx: y\n", "endsp": "x\ny  ",
        "list": ["a\nb", "  x\ny"], "nested": [{"k": "a\nb\n"}]
    });
    let s = serde_saphyr::to_string(&v).unwrap();
    print!("{s}");
    let back: serde_json::Value = serde_saphyr::from_str(&s).unwrap();
    println!("roundtrip equal: {}", back == v);
}
