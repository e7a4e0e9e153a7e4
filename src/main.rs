fn main() {
    println!("rlhf");
}
